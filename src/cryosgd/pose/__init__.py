"""Pose search: rotation grids, symmetry, shifts and batched scores."""
