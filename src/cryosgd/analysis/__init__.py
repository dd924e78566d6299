"""Analysis: Fourier shell correlation, the Hessian and its conditioning, convergence traces."""
