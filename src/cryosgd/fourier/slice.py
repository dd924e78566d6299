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

from typing import Literal

import torch
from torch import Tensor

from cryosgd.compiled import maybe_compile
from cryosgd.conventions import slice_points

Interp = Literal["trilinear", "nearest"]

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
    corners, sign = _corners(points, shape, interp)
    return torch.stack([i for i, _ in corners], -1), torch.stack([w for _, w in corners], -1), sign


def _corners(points: Tensor, shape: tuple[int, int, int], interp: Interp):
    """:func:`stencil` as a list of ``(index (B, P), weight (B, P))``, one per corner.

    Written out corner by corner so that ``torch.compile`` fuses the whole stencil and
    the gathers into one loop (3-5x faster than a (B, P, 8) formulation).
    """
    n, _, nh = shape
    sign = 1.0 - 2.0 * (points[..., 0] < 0).to(points.dtype)
    qx, qy, qz = (points * sign[..., None]).unbind(-1)

    def flat(z: Tensor, y: Tensor, x: Tensor) -> Tensor:  # x ≤ n/2 − 1 for |q| ≤ n/2 − 1; clamp guards memory
        return (torch.remainder(z, n) * n + torch.remainder(y, n)) * nh + x.clamp(max=nh - 1)

    if interp == "nearest":
        x, y, z = (torch.floor(c + 0.5).long() for c in (qx, qy, qz))
        return [(flat(z, y, x), torch.ones_like(qx))], sign
    if interp != "trilinear":
        raise ValueError(f"interpolation must be 'trilinear' or 'nearest', not {interp!r}")
    x0, y0, z0 = torch.floor(qx), torch.floor(qy), torch.floor(qz)
    fx, fy, fz = qx - x0, qy - y0, qz - z0
    x0, y0, z0 = x0.long(), y0.long(), z0.long()
    return [(flat(z0 + dz, y0 + dy, x0 + dx), wz * wy * wx)
            for dz, wz in ((0, 1 - fz), (1, fz))
            for dy, wy in ((0, 1 - fy), (1, fy))
            for dx, wx in ((0, 1 - fx), (1, fx))], sign


def _extract(volume_ri: Tensor, rotations: Tensor, freq_px: Tensor, interp: Interp) -> Tensor:
    """Kernel on real views: ``(n, n, nh, 2)`` map → ``(B, P, 2)`` (real, imaginary) values."""
    corners, sign = _corners(slice_points(rotations, freq_px), volume_ri.shape[:3], interp)
    real, imag = volume_ri[..., 0].reshape(-1), volume_ri[..., 1].reshape(-1)
    value_re = value_im = 0.0
    for i, w in corners:
        value_re = value_re + w * real[i]
        value_im = value_im + w * imag[i]
    return torch.stack([value_re, value_im * sign], -1)


def _insert(out: Tensor, values: Tensor, rotations: Tensor, freq_px: Tensor, shape: tuple[int, int, int],
            interp: Interp, conjugate: tuple[bool, ...], powers: tuple[int, ...]) -> None:
    """Kernel on real channels: adds ``(B, P, C)`` values into the ``(n · n · nh, C)`` map ``out``.

    Channel c is multiplied by the flip sign where ``conjugate[c]`` (imaginary parts) and
    scattered with the interpolation weights to the power ``powers[c]``.
    """
    index, weight, sign = stencil(slice_points(rotations, freq_px), shape, interp)
    channels = [values[..., c] * sign if flip else values[..., c] for c, flip in enumerate(conjugate)]
    contributions = torch.stack([weight**p * v[..., None] for v, p in zip(channels, powers)], -1)
    out.index_add_(0, index.reshape(-1), contributions.reshape(-1, len(powers)))


_CHUNK_POINTS = 32768  # scatter this many slice points per kernel call: its buffers stay in cache


_extract_fast = maybe_compile(_extract)
_insert_fast = maybe_compile(_insert)


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
    maps, _ = insert_many(values[None], None, rotations, freq_px, shape, interp)
    return maps[0]


def insert_many(values: Tensor | None, real: Tensor | None, rotations: Tensor, freq_px: Tensor,
                shape: tuple[int, int, int], interp: Interp = "trilinear",
                powers: tuple[int, ...] = (2,)) -> tuple[Tensor | None, Tensor | None]:
    """Several back-projections sharing one stencil and one scatter.

    Args:
        values: ``(K, B, P)`` complex values, each back-projected as by :func:`insert`, or None.
        real: ``(B, P)`` real values, scattered once with the interpolation weights to each of
            ``powers``, or None. Applied to ``c²``, power 2 gives the diagonal of
            ``Σ Pᵀ diag(c²) P`` (the exact Hessian diagonal) and power 1 its row sums, the
            same matrix applied to the all-ones map (trilinear weights sum to 1).

    Returns:
        ``(K, n, n, nh)`` complex maps (or None) and ``(len(powers), n, n, nh)`` real maps (or None).
    """
    channels, conjugate, scatter_powers = [], [], []
    if values is not None:
        for v in values:
            channels += [v.real, v.imag]
            conjugate += [False, True]
            scatter_powers += [1, 1]
    if real is not None:
        channels += [real] * len(powers)
        conjugate += [False] * len(powers)
        scatter_powers += list(powers)
    stacked = torch.stack(channels, -1)
    out = stacked.new_zeros(shape[0] * shape[1] * shape[2], len(scatter_powers))
    chunk = max(1, _CHUNK_POINTS // freq_px.shape[0])
    for start in range(0, len(rotations), chunk):
        _insert_fast(out, stacked[start:start + chunk], rotations[start:start + chunk], freq_px, tuple(shape),
                     interp, tuple(conjugate), tuple(scatter_powers))
    out = out.reshape(*shape, len(scatter_powers)).movedim(-1, 0)
    complex_channels = 0 if values is None else 2 * len(values)
    maps = None if values is None else torch.view_as_complex(
        out[:complex_channels].reshape(len(values), 2, *shape).movedim(1, -1).contiguous())
    return maps, (None if real is None else out[complex_channels:].contiguous())


def apodization(box_px: int, interp: Interp, pad: int = 1, dtype=torch.float64) -> Tensor:
    """``(n,)`` real-space profile that Fourier-space interpolation multiplies a map by, per axis.

    Slicing a map's Fourier transform, sampled on a ``pad·n`` grid, by trilinear (nearest)
    interpolation is slicing that of ``v · sinc²(x / (pad·n))`` (``sinc``), x from the box
    centre. :func:`cryosgd.model.project.oversampled_ft` divides by it before projecting;
    a reconstruction's map is multiplied by it (the gridding correction).
    """
    x = (torch.arange(box_px, dtype=dtype) - box_px // 2) / (pad * box_px)
    return torch.sinc(x) ** (2 if interp == "trilinear" else 1)
