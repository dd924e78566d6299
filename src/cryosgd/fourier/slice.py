"""Central slices of a Fourier half-grid map and their exact adjoint.

``extract`` samples an rfft half-grid map ``(n, n, n // 2 + 1)`` at the central-slice
points ``Aᵀ (kx, ky, 0)`` of a batch of rotations, by trilinear or nearest-neighbour
interpolation on the periodic grid. Points with ``qx < 0`` are read at ``−q`` and
conjugated (Hermitian symmetry of a real map), so only stored voxels are touched.
``insert`` is the exact adjoint of ``extract`` for the real inner product
``⟨a, b⟩ = Re Σ conj(a) b`` on both sides: it scatters each value, conjugated where the
point was flipped, with the same interpolation weights (back-projection).

Frequencies are in Fourier-index units; ``|q| ≤ n/2 − 1`` keeps every corner with a
non-zero weight inside the grid (see :class:`cryosgd.fourier.grids.FourierGrid`).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from cryosgd.conventions import slice_points

Interp = Literal["trilinear", "nearest"]

_CORNERS = torch.tensor([[dz, dy, dx] for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)])


def stencil(points: Tensor, shape: tuple[int, int, int], interp: Interp) -> tuple[Tensor, Tensor, Tensor]:
    """Voxels and weights that interpolate a half-grid map at ``points``.

    Args:
        points: ``(B, P, 3)`` frequencies ``(qx, qy, qz)`` in Fourier-index units.
        shape: map half-grid shape ``(n, n, n // 2 + 1)``.
        interp: ``"trilinear"`` (8 corners) or ``"nearest"`` (1 voxel).

    Returns:
        ``index (B, P, K)`` flat voxel indices, ``weight (B, P, K)`` interpolation weights,
        ``sign (B, P)`` −1 where the value is read conjugated (``qx < 0``), else +1.
    """
    n, _, nh = shape
    flip = points[..., 0] < 0
    q = torch.where(flip[..., None], -points, points).flip(-1)  # (qz, qy, qx)
    sign = 1.0 - 2.0 * flip.to(points.dtype)
    if interp == "nearest":
        corner = torch.floor(q + 0.5)[..., None, :]
        weight = torch.ones_like(corner[..., 0])
    elif interp == "trilinear":
        base = torch.floor(q)
        frac = (q - base)[..., None, :]
        offsets = _CORNERS.to(device=q.device, dtype=q.dtype)
        corner = base[..., None, :] + offsets
        weight = torch.where(offsets > 0, frac, 1 - frac).prod(-1)
    else:
        raise ValueError(f"interpolation must be 'trilinear' or 'nearest', not {interp!r}")
    c = corner.long()
    index = (torch.remainder(c[..., 0], n) * n + torch.remainder(c[..., 1], n)) * nh + c[..., 2].clamp(max=nh - 1)
    return index, weight, sign


def _extract(volume_ri: Tensor, rotations: Tensor, freq_px: Tensor, interp: Interp) -> Tensor:
    """Kernel on real views: ``(n, n, nh, 2)`` map → ``(B, P, 2)`` (real, imaginary) values."""
    index, weight, sign = stencil(slice_points(rotations, freq_px), volume_ri.shape[:3], interp)
    voxels = volume_ri.reshape(-1, 2)[index]  # (B, P, K, 2)
    value = (voxels * weight[..., None]).sum(-2)
    return torch.stack([value[..., 0], value[..., 1] * sign], -1)


def _insert(values_ri: Tensor, rotations: Tensor, freq_px: Tensor, shape: tuple[int, int, int],
            interp: Interp) -> Tensor:
    """Kernel on real views: ``(B, P, 2)`` values → ``(n, n, nh, 2)`` map."""
    index, weight, sign = stencil(slice_points(rotations, freq_px), shape, interp)
    v = torch.stack([values_ri[..., 0], values_ri[..., 1] * sign], -1)
    contributions = (weight[..., None] * v[..., None, :]).reshape(-1, 2)
    out = v.new_zeros(shape[0] * shape[1] * shape[2], 2)
    out.index_add_(0, index.reshape(-1), contributions)
    return out.reshape(*shape, 2)


def _maybe_compile(fn, dynamic: bool | None):
    """``torch.compile`` the hot path unless ``CRYOSGD_COMPILE=0``; one code for CPU and GPU.

    ``dynamic`` was chosen by measurement (benchmarks/slice_throughput.py): the gather is
    20x faster traced with symbolic shapes, the scatter 1.3x faster specialised to the map
    shape (it turns dynamic in the batch size only once a second size is seen).
    """
    if os.environ.get("CRYOSGD_COMPILE", "1") == "0":
        return fn
    return torch.compile(fn, dynamic=dynamic)


_extract_fast = _maybe_compile(_extract, dynamic=True)
_insert_fast = _maybe_compile(_insert, dynamic=None)


def extract(volume_ft: Tensor, rotations: Tensor, freq_px: Tensor, interp: Interp = "trilinear") -> Tensor:
    """Central slices of ``volume_ft``.

    Args:
        volume_ft: ``(n, n, n // 2 + 1)`` complex rfft half-grid map.
        rotations: ``(B, 3, 3)`` RELION rotation matrices (real dtype of ``volume_ft``).
        freq_px: ``(P, 2)`` image frequencies ``(kx, ky)``, Fourier-index units.
        interp: ``"trilinear"`` or ``"nearest"``.

    Returns:
        ``(B, P)`` complex slice values. Differentiable in ``volume_ft``; its autograd
        gradient is :func:`insert`.
    """
    return torch.view_as_complex(_extract_fast(torch.view_as_real(volume_ft), rotations, freq_px, interp))


def insert(values: Tensor, rotations: Tensor, freq_px: Tensor, shape: tuple[int, int, int],
           interp: Interp = "trilinear") -> Tensor:
    """Exact adjoint of :func:`extract`: back-project ``(B, P)`` values into a ``shape`` half-grid."""
    return torch.view_as_complex(_insert_fast(torch.view_as_real(values), rotations, freq_px, tuple(shape), interp))
