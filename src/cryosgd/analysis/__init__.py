"""Analysis: Fourier shell correlation, (later) conditioning."""
