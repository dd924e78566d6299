"""Fourier grids: the disc of image frequencies the model works on, and Fourier cropping.

The working set of image frequencies is the half-disc ``{(kx, ky): kx ≥ 0, |k| ≤ radius}``
of the rfft2 half-plane (see :mod:`cryosgd.conventions`). Cropping to a working box
``n`` keeps the frequencies and their spacing of the original box, so the effective
pixel size becomes ``pixel_A · box / n`` and the map is an ``(n, n, n // 2 + 1)`` half-grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from cryosgd.conventions import fft_index
from cryosgd.errors import InputError


@dataclass(frozen=True)
class FourierGrid:
    """Sampling of images (box ``box_px``, ``pixel_A``) cropped to ``work_box_px``.

    ``radius_px`` (Fourier-index units) bounds the frequencies used; it must stay below
    ``work_box_px / 2`` so that trilinear corners never reach the Nyquist plane.
    """

    box_px: int
    pixel_A: float
    work_box_px: int
    radius_px: float

    @classmethod
    def create(cls, box_px: int, pixel_A: float, work_box_px: int | None = None, radius_px: float | None = None,
               source=None) -> FourierGrid:
        """The grid of images of ``box_px`` pixels of ``pixel_A`` Å, cropped to ``work_box_px``.

        ``source`` names where the box and pixel size come from in error messages (a file, or
        an option such as ``"--box"``).
        """
        where = f"{source}: " if source is not None else ""
        if box_px % 2 or box_px < 4:
            raise InputError(None, f"{where}images of {box_px} px: cryosgd needs an even box of at least 4 px")
        if not pixel_A > 0:
            raise InputError(None, f"{where}pixel size {pixel_A} Å: must be positive")
        work = box_px if work_box_px is None else int(work_box_px)
        if work % 2 or work < 4 or work > box_px:
            raise InputError(None, f"--box {work}: the working box must be even, at least 4 and at most the "
                                   f"images' {box_px} px")
        radius = work / 2 - 1 if radius_px is None else float(radius_px)
        if not 0 < radius <= work / 2 - 1:
            raise InputError(None, f"radius {radius} px: must be in (0, {work // 2 - 1}] for box {work}")
        return cls(int(box_px), float(pixel_A), work, radius)

    @property
    def work_pixel_A(self) -> float:
        return self.pixel_A * self.box_px / self.work_box_px

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        n = self.work_box_px
        return (n, n, n // 2 + 1)

    @property
    def freq_step_invA(self) -> float:
        return 1.0 / (self.box_px * self.pixel_A)

    @cached_property
    def freq_px(self) -> Tensor:
        """``(P, 2)`` float64 frequencies ``(kx, ky)`` of the half-disc, row-major in (ky, kx)."""
        r = math.floor(self.radius_px)
        ky, kx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(0, r + 1), indexing="ij")
        keep = kx**2 + ky**2 <= self.radius_px**2
        return torch.stack([kx[keep], ky[keep]], -1).double()

    @cached_property
    def shell_px(self) -> Tensor:
        """``(P,)`` 2-D shell number round(|k|) of every half-disc pixel."""
        return torch.round(torch.linalg.norm(self.freq_px, dim=-1)).long()

    def freq_invA(self) -> Tensor:
        """``(P, 2)`` float64 frequencies in Å⁻¹."""
        return self.freq_px * self.freq_step_invA

    @cached_property
    def multiplicity(self) -> Tensor:
        """``(P,)`` how often each half-plane pixel stands in the full plane: 1 at kx = 0, else 2."""
        return torch.where(self.freq_px[:, 0] == 0, 1.0, 2.0).double()

    def take(self, images_ft: Tensor) -> Tensor:
        """``(..., box, box // 2 + 1)`` rfft2 half-planes → ``(..., P)`` disc values."""
        k = self.freq_px.long()
        return images_ft[..., fft_index(k[:, 1], images_ft.shape[-2]), k[:, 0]]

    def put(self, values: Tensor, box_px: int) -> Tensor:
        """``(..., P)`` disc values → ``(..., box_px, box_px // 2 + 1)`` half-planes, zero elsewhere."""
        k = self.freq_px.long()
        out = values.new_zeros(*values.shape[:-1], box_px, box_px // 2 + 1)
        out[..., fft_index(k[:, 1], box_px), k[:, 0]] = values
        return out


def shell_index(box_px: int, device=None) -> Tensor:
    """``(n, n, n // 2 + 1)`` RELION shell number of every rfft half-grid voxel."""
    k = torch.fft.fftfreq(box_px, 1 / box_px, dtype=torch.float64, device=device)
    kx = torch.arange(box_px // 2 + 1, dtype=torch.float64, device=device)
    radius = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return torch.round(radius).long()


def voxel_multiplicity(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> Tensor:
    """``m₃``: how many voxels of the full cube each half-grid voxel stands for.

    1 on the planes kx = 0 and kx = n/2 (Nyquist; boxes are even), 2 elsewhere.
    """
    m = torch.full(shape, 2.0, device=device, dtype=dtype)
    m[..., 0] = 1.0
    m[..., -1] = 1.0
    return m
