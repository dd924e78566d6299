"""Operations on whole maps: resampling to another grid, low-pass filters, soft masks.

Real-space maps are ``[z, y, x]`` arrays with the centre at voxel ``n // 2``; Fourier maps are
rfft half-grids (:mod:`cryosgd.conventions`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryosgd.conventions import ft_to_map, map_to_ft
from cryosgd.fourier.grids import shell_index


def resample(volume: Tensor, voxel_A: float, box_px: int, pixel_A: float) -> Tensor:
    """A real-space map of ``voxel_A`` Å voxels on a ``box_px`` grid of ``pixel_A`` Å, same centre.

    The same voxel size: Fourier padding or cropping (exact up to the band limit). Otherwise
    trilinear interpolation in real space after a low-pass to the coarser Nyquist limit.
    """
    n = volume.shape[0]
    if abs(voxel_A - pixel_A) <= 1e-4 * pixel_A:
        return _pad_or_crop(volume, box_px)
    if pixel_A > voxel_A:
        volume = low_pass(volume, voxel_A, 2 * pixel_A, edge_shells=2)
    axis = (torch.arange(box_px, dtype=volume.dtype, device=volume.device) - box_px // 2) * pixel_A / voxel_A
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    grid = torch.stack([x, y, z], -1) / (n / 2) + (n // 2 - n / 2 + 0.5) / (n / 2)  # align_corners=False
    return torch.nn.functional.grid_sample(volume[None, None], grid[None], mode="bilinear", padding_mode="zeros",
                                           align_corners=False)[0, 0]


def _pad_or_crop(volume: Tensor, box_px: int) -> Tensor:
    """Centre-preserving pad with zeros or crop in real space."""
    n = volume.shape[0]
    out = volume.new_zeros(box_px, box_px, box_px)
    lo_in, lo_out = max(0, n // 2 - box_px // 2), max(0, box_px // 2 - n // 2)
    size = min(n, box_px)
    out[lo_out:lo_out + size, lo_out:lo_out + size, lo_out:lo_out + size] = \
        volume[lo_in:lo_in + size, lo_in:lo_in + size, lo_in:lo_in + size]
    return out


def low_pass_ft(volume_ft: Tensor, box_px: int, pixel_A: float, resolution_A: float,
                edge_shells: float = 3.0) -> Tensor:
    """Multiply a half-grid map by a raised-cosine low-pass: 1 below ``resolution_A``, 0 beyond
    ``edge_shells`` shells further out."""
    shells = shell_index(box_px, volume_ft.device).to(volume_ft.real.dtype)
    cutoff = box_px * pixel_A / resolution_A
    t = ((shells - cutoff) / edge_shells).clamp(0, 1)
    return volume_ft * (0.5 + 0.5 * torch.cos(math.pi * t))


def low_pass(volume: Tensor, voxel_A: float, resolution_A: float, edge_shells: float = 3.0) -> Tensor:
    """:func:`low_pass_ft` of a real-space map."""
    n = volume.shape[0]
    return ft_to_map(low_pass_ft(map_to_ft(volume), n, voxel_A, resolution_A, edge_shells), n)


def _centre_distance_px(box_px: int, dtype=torch.float64, device=None) -> Tensor:
    """``[z, y, x]`` distance of every voxel from the box's centre (voxel n//2 on each axis)."""
    axis = torch.arange(box_px, dtype=dtype, device=device) - box_px // 2
    return torch.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)


def soft_sphere(box_px: int, radius_px: float, edge_px: float = 5.0, dtype=torch.float64, device=None) -> Tensor:
    """A ``[z, y, x]`` mask: 1 within ``radius_px`` of the centre, a raised-cosine edge of
    ``edge_px`` beyond, 0 outside."""
    t = ((_centre_distance_px(box_px, dtype, device) - radius_px) / edge_px).clamp(0, 1)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def support_radius_px(mask: Tensor, threshold: float = 0.01) -> float:
    """The distance from the box's centre of the farthest voxel of ``mask`` above ``threshold``."""
    return float(_centre_distance_px(mask.shape[0], device=mask.device)[mask > threshold].max())


def masked_ft(volume_ft: Tensor, mask: Tensor) -> Tensor:
    """The half-grid map of ``mask ×`` the real-space map of ``volume_ft`` (solvent flattening)."""
    n = mask.shape[0]
    return map_to_ft(ft_to_map(volume_ft, n) * mask.to(volume_ft.real.dtype)).to(volume_ft.dtype)


def pad_ft(volume_ft: Tensor, box_px: int) -> Tensor:
    """A half-grid map of a box of ``n`` voxels embedded in the half-grid of ``box_px ≥ n``
    (zero beyond): the same frequencies at the same spacing, i.e. the map on a grid
    ``box_px / n`` times finer over the same length (Fourier interpolation).

    The coefficients are the transform's (unnormalised): the finer map's values equal the
    coarser one's where they coincide after scaling by ``(box_px / n)³``.
    """
    n = volume_ft.shape[0]
    out = volume_ft.new_zeros(box_px, box_px, box_px // 2 + 1)
    k = torch.fft.fftfreq(n, 1 / n).long()
    rows = torch.remainder(k, box_px)
    out[rows[:, None], rows[None, :], : n // 2 + 1] = volume_ft
    return out * (box_px / n) ** 3


def shift_ft(volume_ft: Tensor, shift_px: Tensor) -> Tensor:
    """The half-grid map moved by ``shift_px (x, y, z)`` voxels (a phase ramp)."""
    n = volume_ft.shape[0]
    k = torch.fft.fftfreq(n, 1 / n, dtype=torch.float64, device=volume_ft.device)
    kx = torch.arange(n // 2 + 1, dtype=torch.float64, device=volume_ft.device)
    shift = shift_px.to(torch.float64)
    angle = -2 * math.pi / n * (kx[None, None, :] * shift[0] + k[None, :, None] * shift[1] + k[:, None, None] * shift[2])
    return volume_ft * torch.polar(torch.ones_like(angle), angle).to(volume_ft.dtype)


def centre_of_mass_px(volume: Tensor) -> Tensor:
    """``(x, y, z)`` centre of mass of the positive part of a ``[z, y, x]`` map, relative to the
    box centre (voxel ``n // 2``)."""
    n = volume.shape[0]
    weight = volume.clamp(min=0)
    axis = torch.arange(n, dtype=volume.dtype, device=volume.device) - n // 2
    total = weight.sum().clamp(min=torch.finfo(volume.dtype).tiny)
    z = (weight.sum((1, 2)) * axis).sum() / total
    y = (weight.sum((0, 2)) * axis).sum() / total
    x = (weight.sum((0, 1)) * axis).sum() / total
    return torch.stack([x, y, z])
