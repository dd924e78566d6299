"""Objective: weighted least squares in Fourier space, its gradient, H·z and diag(H)."""
