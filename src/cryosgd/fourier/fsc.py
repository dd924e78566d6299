"""Fourier shell correlation with RELION's shells.

Shell i holds the voxels whose frequency radius rounds to i (in Fourier-index units of the
box), as in RELION's ``getFSC``; FSC(i) = Re Σ F₁ conj(F₂) / √(Σ|F₁|² Σ|F₂|²) over the full
cube, computed on the rfft half-grid with each voxel counted as often as it stands in the
cube. Shell i is at resolution ``box · pixel / i`` Å. The resolution at a threshold is that of
the last shell before the FSC first drops below it (no interpolation), as RELION reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryosgd.conventions import map_to_ft
from cryosgd.fourier.grids import shell_index, voxel_multiplicity


def fsc_of_ft(a_ft: Tensor, b_ft: Tensor, box_px: int) -> np.ndarray:
    """FSC per shell 0 … box/2 of two rfft half-grid maps of a ``box_px`` cube."""
    shells = shell_index(box_px, a_ft.device).reshape(-1)
    weight = voxel_multiplicity(a_ft.shape, a_ft.device, torch.float64).reshape(-1)
    a, b = a_ft.reshape(-1).to(torch.complex128), b_ft.reshape(-1).to(torch.complex128)
    keep = shells <= box_px // 2
    sums = [torch.bincount(shells[keep], (weight * v)[keep], minlength=box_px // 2 + 1)
            for v in ((a * b.conj()).real, a.abs() ** 2, b.abs() ** 2)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums[0] / torch.sqrt(sums[1] * sums[2])).cpu().numpy()


@dataclass(frozen=True)
class FSCCurve:
    """FSC per shell with the resolution of each shell (Å)."""

    fsc: np.ndarray
    box_px: int
    pixel_A: float

    @property
    def resolution_A(self) -> np.ndarray:
        shells = np.arange(len(self.fsc), dtype=float)
        with np.errstate(divide="ignore"):
            return self.box_px * self.pixel_A / shells

    def mean(self) -> float:
        """Mean FSC over shells 1 … box/2: one number that rises as the maps gain signal."""
        return float(np.nan_to_num(self.fsc[1:self.box_px // 2 + 1]).mean())

    def resolution_at(self, threshold: float) -> float:
        """Resolution (Å) of the last shell before the FSC first drops below ``threshold``."""
        below = np.nonzero(~(self.fsc[1:] >= threshold))[0]
        last = len(self.fsc) - 1 if len(below) == 0 else below[0]
        return float("inf") if last == 0 else float(self.box_px * self.pixel_A / last)


def fsc(a: np.ndarray, b: np.ndarray, pixel_A: float, mask: np.ndarray | None = None) -> FSCCurve:
    """FSC of two real-space ``[z, y, x]`` maps, optionally both multiplied by ``mask``."""
    ta, tb = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if mask is not None:
        ta, tb = ta * torch.as_tensor(mask, dtype=torch.float64), tb * torch.as_tensor(mask, dtype=torch.float64)
    return FSCCurve(fsc_of_ft(map_to_ft(ta), map_to_ft(tb), a.shape[0]), a.shape[0], pixel_A)
