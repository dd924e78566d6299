"""File formats: RELION STAR and MRC/MRCS."""
