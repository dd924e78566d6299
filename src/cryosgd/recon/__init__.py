"""Reconstruction drivers: known poses, gold-standard half-sets, checkpoints."""
