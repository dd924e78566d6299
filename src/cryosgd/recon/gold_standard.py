"""The gold standard: two half-sets, each with its own map; the FSC between them.

Half-sets come from ``rlnRandomSubset`` when present, else from a seeded random split. The
FSC of the half maps gives the resolution and, through SSNR = FSC/(1 − FSC), the Wiener prior.
"""

from __future__ import annotations

import numpy as np
import torch

from cryosgd.conventions import ft_to_map, map_to_ft
from cryosgd.data.particles import ParticleTable
from cryosgd.errors import InputError
from cryosgd.fourier.fsc import FSCCurve, fsc_of_ft
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import apodization


def split_halves(table: ParticleTable, seed: int) -> list[np.ndarray]:
    """Particle indices of half-sets 1 and 2 (rlnRandomSubset, or a seeded random split)."""
    if table.random_subset is not None:
        halves = [np.nonzero(table.random_subset == h)[0] for h in (1, 2)]
    else:
        order = np.random.default_rng(seed).permutation(len(table))
        halves = [np.sort(order[0::2]), np.sort(order[1::2])]
    for h, index in enumerate(halves, start=1):
        if len(index) == 0:
            raise InputError(table.source, f"rlnRandomSubset: half-set {h} is empty")
    return halves


def half_map_fsc(x1: torch.Tensor, x2: torch.Tensor, grid: FourierGrid, interp: str) -> FSCCurve:
    """FSC of two half maps (rfft half-grids of the working box) per RELION shell, after the
    gridding correction: the FSC of the maps that are written."""
    maps = [torch.as_tensor(map_of(x, grid, interp)).to(x.device) for x in (x1, x2)]
    return FSCCurve(fsc_of_ft(*(map_to_ft(m.double()) for m in maps), grid.work_box_px), grid.work_box_px,
                    grid.work_pixel_A)


def ssnr_between(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """SSNR = FSC / (1 − FSC) per shell of the fitted half maps (before the gridding correction:
    the coefficients the prior acts on), RELION's estimate for the Wiener prior τ²."""
    fsc = torch.as_tensor(fsc_of_ft(x1, x2, x1.shape[0]), device=x1.device)
    return fsc / (1 - fsc)


def map_of(x: torch.Tensor, grid: FourierGrid, interp: str) -> np.ndarray:
    """Real-space map at the working box, in the density units of the full-box map.

    The gridding correction multiplies by the interpolation's apodisation: the fitted ``x``
    is the transform of ``v / sinc²``, whose slices match projections of ``v``.
    """
    n = grid.work_box_px
    profile = apodization(n, interp).to(x.device)
    volume = ft_to_map(x.to(torch.complex128), n) * (n / grid.box_px) ** 3
    volume = volume * profile[:, None, None] * profile[None, :, None] * profile[None, None, :]
    return volume.cpu().numpy().astype(np.float32)
