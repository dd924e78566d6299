"""Batch: what the forward model needs about a set of particles, as tensors on a device.

Poses are plain fields so that later pose search can replace them between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from cryosgd.conventions import euler_to_matrix, images_to_ft
from cryosgd.data.particles import ParticleTable
from cryosgd.data.stack import ImageStack
from cryosgd.fourier.grids import FourierGrid
from cryosgd.model.ctf import CTFParams


@dataclass
class Batch:
    """Particles ``index`` of a table: rotations, shifts, CTF and (optionally) images.

    Fields:
        index: ``(B,)`` particle indices into the table.
        rotations: ``(B, 3, 3)`` RELION rotation matrices.
        shift_A: ``(B, 2)`` origins (rlnOriginXAngst, rlnOriginYAngst).
        ctf: CTF parameters, or None for CTF-free data.
        images_ft: ``(B, P)`` complex disc values of the images' rfft2 (grid order), or None.
        optics_group: ``(B,)`` 0-based optics-group index (selects the noise spectrum), or None
            for a single group.
        cache: values derived from the fields (e.g. the CTF · phase factor), computed once.
    """

    index: np.ndarray
    rotations: Tensor
    shift_A: Tensor
    ctf: CTFParams | None
    images_ft: Tensor | None = None
    optics_group: Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.index)

    def groups(self, device=None) -> Tensor:
        """``(B,)`` optics-group index of every image (all 0 when the batch has none)."""
        if self.optics_group is None:
            return torch.zeros(len(self), dtype=torch.long, device=device)
        return self.optics_group.to(device)


def make_batch(table: ParticleTable, index: np.ndarray, grid: FourierGrid, stack: ImageStack | None = None,
               dtype: torch.dtype = torch.float32, device=None) -> Batch:
    """Gather poses, shifts, CTF and, when ``stack`` is given, FFT'd cropped images."""
    index = np.asarray(index)
    tensor = lambda a: torch.as_tensor(np.asarray(a)[index], dtype=dtype, device=device)  # noqa: E731
    rotations = euler_to_matrix(torch.as_tensor(table.require_poses()[index], dtype=torch.float64))
    ctf = CTFParams.from_table(table, index, dtype=dtype, device=device) if table.has_ctf else None
    images_ft = None
    if stack is not None:
        images = torch.as_tensor(stack.read(index), device=device).to(dtype)
        images_ft = grid.take(images_to_ft(images))
    groups = torch.as_tensor(table.optics_group[index], device=device)
    return Batch(index, rotations.to(device=device, dtype=dtype), tensor(table.shift_A), ctf, images_ft, groups)


def batch_indices(n: int, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Split ``range(n)`` into consecutive batches, shuffled first when ``rng`` is given."""
    order = np.arange(n) if rng is None else rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
