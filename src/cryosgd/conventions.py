"""Every convention of cryosgd, in one place.

Axis order
    Real-space maps are indexed ``[z, y, x]`` and images ``[y, x]``, as stored in MRC
    files; the centre of a box of ``n`` voxels is index ``n // 2`` on every axis
    (RELION's convention).

Fourier layout
    A real map is represented by its ``rfftn`` half-grid after ``ifftshift``, shape
    ``(n, n, n // 2 + 1)``: axes ``[kz, ky, kx]``, the ``kz`` and ``ky`` axes in standard
    (unshifted) FFT order ``0, 1, …, n/2 − 1, −n/2, …, −1``, and ``kx ≥ 0`` only.
    Images likewise: ``rfft2`` half-plane of shape ``(n, n // 2 + 1)``, axes ``[ky, kx]``.
    FFTs are unnormalised in the forward direction, so the central-slice theorem holds
    with no scale factor: ``rfft2(Σ_z v)[ky, kx] = rfftn(v)[0, ky, kx]``. Points with
    ``kx < 0`` are read through Hermitian symmetry, ``V(−k) = conj(V(k))``.
    Fourier cropping keeps the frequencies and their spacing ``Δk = 1 / (box · pixel_A)``
    of the original box: coefficients do not depend on the working box.

Rotations
    RELION ZYZ Euler angles (rot, tilt, psi) in degrees give
    ``A = R_z(psi) · R_y(tilt) · R_z(rot)``; the image frequency ``(kx, ky)`` samples
    the map at ``Aᵀ · (kx, ky, 0)`` (the central-slice relation).

Shifts
    RELION origins ``rlnOriginXAngst/YAngst`` (``shift_A``, in Å): the particle centre
    sits at ``box centre − origin``. A predicted image is the projection moved by
    ``−origin``, i.e. multiplied by ``exp(+2πi k · origin)`` with ``k`` in Å⁻¹.

Units
    Names carry their unit: ``_A`` for Å, ``_invA`` for Å⁻¹, ``_px`` for pixels (or
    Fourier-index units), ``_deg`` for degrees.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def euler_to_matrix(angles_deg: Tensor) -> Tensor:
    """RELION ZYZ Euler angles ``(..., 3)`` = (rot, tilt, psi) in degrees → ``(..., 3, 3)``."""
    a, b, g = torch.deg2rad(angles_deg).unbind(-1)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    rows = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def matrix_to_euler(rotations: Tensor) -> Tensor:
    """Inverse of :func:`euler_to_matrix`: ``(..., 3, 3)`` → (rot, tilt, psi) in degrees.

    At tilt = 0 or 180° only rot ± psi is defined; rot is then set to 0.
    """
    r = rotations
    tilt = torch.arccos(r[..., 2, 2].clamp(-1.0, 1.0))
    gimbal = torch.sin(tilt).abs() < 1e-6
    rot = torch.where(gimbal, torch.zeros_like(tilt), torch.atan2(r[..., 2, 1], r[..., 2, 0]))
    psi_general = torch.atan2(r[..., 1, 2], -r[..., 0, 2])
    flip = torch.where(r[..., 2, 2] < 0, -1.0, 1.0).to(r.dtype)
    psi_gimbal = torch.atan2(-r[..., 1, 0] * flip, r[..., 0, 0] * flip)
    psi = torch.where(gimbal, psi_gimbal, psi_general)
    return torch.rad2deg(torch.stack([rot, tilt, psi], -1))


def slice_points(rotations: Tensor, freq_px: Tensor) -> Tensor:
    """Central-slice sample points ``Aᵀ (kx, ky, 0)``.

    Args:
        rotations: ``(B, 3, 3)`` RELION rotation matrices.
        freq_px: ``(P, 2)`` image frequencies ``(kx, ky)`` in Fourier-index units.

    Returns:
        ``(B, P, 3)`` map frequencies ``(qx, qy, qz)`` in Fourier-index units.
    """
    kx, ky = freq_px[:, 0], freq_px[:, 1]
    return kx[None, :, None] * rotations[:, None, 0, :] + ky[None, :, None] * rotations[:, None, 1, :]


def shift_phase(freq_invA: Tensor, shift_A: Tensor) -> Tensor:
    """Phase factors that move projections by ``−origin`` (RELION's origin sign).

    Args:
        freq_invA: ``(P, 2)`` image frequencies ``(kx, ky)`` in Å⁻¹.
        shift_A: ``(B, 2)`` origins ``(rlnOriginXAngst, rlnOriginYAngst)`` in Å.

    Returns:
        ``(B, P)`` complex ``exp(+2πi k · origin)``.
    """
    angle = shift_angle(freq_invA, shift_A)
    return torch.polar(torch.ones_like(angle), angle)


def shift_angle(freq_invA: Tensor, shift_A: Tensor) -> Tensor:
    """``(B, P)`` phase angles 2π k · origin (radians) of :func:`shift_phase`."""
    return 2 * math.pi * (shift_A[:, None, 0] * freq_invA[:, 0] + shift_A[:, None, 1] * freq_invA[:, 1])


def map_to_ft(volume: Tensor) -> Tensor:
    """Real map ``(n, n, n)`` indexed [z, y, x] → rfft half-grid ``(n, n, n // 2 + 1)``."""
    return torch.fft.rfftn(torch.fft.ifftshift(volume, dim=(-3, -2, -1)), dim=(-3, -2, -1))


def ft_to_map(volume_ft: Tensor, box_px: int) -> Tensor:
    """Inverse of :func:`map_to_ft` for a box of ``box_px`` voxels."""
    volume = torch.fft.irfftn(volume_ft, s=(box_px,) * 3, dim=(-3, -2, -1))
    return torch.fft.fftshift(volume, dim=(-3, -2, -1))


def images_to_ft(images: Tensor) -> Tensor:
    """Real images ``(..., n, n)`` indexed [y, x] → rfft half-planes ``(..., n, n // 2 + 1)``."""
    return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))


def ft_to_images(images_ft: Tensor, box_px: int) -> Tensor:
    """Inverse of :func:`images_to_ft` for a box of ``box_px`` pixels."""
    images = torch.fft.irfft2(images_ft, s=(box_px, box_px))
    return torch.fft.fftshift(images, dim=(-2, -1))


def fft_index(freq_px: Tensor, box_px: int) -> Tensor:
    """Array index of integer frequencies on an unshifted FFT axis of length ``box_px``."""
    return torch.remainder(freq_px, box_px)
