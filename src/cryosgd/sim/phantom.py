"""Analytic test maps: asymmetric sums of Gaussian blobs."""

from __future__ import annotations

import numpy as np


def blob_phantom(box_px: int, n_blobs: int = 12, radius_fraction: float = 0.25,
                 sigma_px: float = 2.0, seed: int = 0) -> np.ndarray:
    """An asymmetric ``[z, y, x]`` float32 map: Gaussian blobs of random weight and position.

    Blob centres lie within ``radius_fraction · box`` of the box centre (voxel ``box // 2``).
    """
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(n_blobs, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    centres = direction * (radius_fraction * box_px * rng.uniform(0, 1, size=(n_blobs, 1)) ** (1 / 3))
    weights = rng.uniform(0.5, 1.5, size=n_blobs)
    axis = np.arange(box_px) - box_px // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    volume = np.zeros((box_px,) * 3)
    for (cx, cy, cz), w in zip(centres, weights):
        volume += w * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_px**2))
    return volume.astype(np.float32)
