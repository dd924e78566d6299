"""Central slices of a Fourier half-grid map and their exact adjoint.

``extract`` samples an rfft half-grid map ``(n, n, n // 2 + 1)`` at the central-slice
points ``Aᵀ (kx, ky, 0)`` of a batch of rotations, by trilinear or nearest-neighbour
interpolation on the periodic grid (``extract_many``: several maps from one stencil). Points
with ``qx < 0`` are read at ``−q`` and conjugated (Hermitian symmetry of a real map), so only
stored voxels are touched.
``insert`` is the exact adjoint of ``extract`` for the real inner product
``⟨a, b⟩ = Re Σ conj(a) b`` on both sides: it scatters each value, conjugated where the
point was flipped, with the same interpolation weights (back-projection).

Frequencies are in Fourier-index units; ``|q| ≤ n/2 − 1`` keeps every corner with a
non-zero weight inside the grid (see :class:`cryosgd.fourier.grids.FourierGrid`).

Kernels work on a *centred* half-grid of shape ``(n + 1, n + 1, nh)``: rows ``0 … n`` of
the ``kz`` and ``ky`` axes hold frequencies ``−n/2 … n/2``, so every corner of a valid
point has a plain index, and no modulo is needed per corner. Its two rows ``±n/2`` are
both the FFT row ``n/2``: ``extract`` reads a centred copy of the map (:func:`_centre`),
``insert`` scatters into a centred buffer and adds it back onto the FFT layout
(:func:`_fold`, the adjoint of the copy). Corners at ``±n/2`` have zero weight except
where rounding puts a point a hair beyond ``n/2 − 1``; they then wrap as on the periodic
grid.

Each kernel has two formulations of the same arithmetic, run by
:func:`cryosgd.compiled.maybe_compile`: eager PyTorch runs a vectorised one (the 8 corners
of every point as an ``(8, points)`` index by broadcasting; extraction gathers each corner's
(real, imaginary) values of every map side by side, insertion scatters each real channel on
its own), ``torch.compile`` one written corner by corner, which it fuses into one loop. On
the CPU both run instead as the C kernels of :mod:`cryosgd.fourier.native` where a C compiler
is present and no autograd is asked for (the back-projection 2.4–3.8× PyTorch's, whose
compiled CPU scatter, with float atomics, is no faster than its eager one; slicing 1.3× the
compiled kernel, with nothing to compile).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from cryosgd.compiled import maybe_compile
from cryosgd.fourier import native
from cryosgd.conventions import slice_points

Interp = Literal["trilinear", "nearest"]

# Slice points per chunk of images, on CPU: 64k points balance the eager kernels' per-call
# overhead against their (8, points) temporaries' cache footprint (box 64, 1,000 images: extract
# 0.10 s and a 4-channel insert 0.19 s, against 0.13 s and 0.23 s at 16k and 0.17 s and 0.20 s
# at 1M); back-projection hands the kernels 32k points at a time (the compiled scatter's best).
# On GPU, fewer and larger launches win.
_EAGER_CHUNK_POINTS = 65536
_SCATTER_CHUNK_POINTS = 32768
_GPU_CHUNK_POINTS = 1 << 20


def _chunk_images(freq_px: Tensor, cpu_points: int) -> int:
    """Images per chunk of about ``cpu_points`` points (CPU), for ``(P, 2)`` frequencies ``freq_px``."""
    points = cpu_points if freq_px.device.type == "cpu" else _GPU_CHUNK_POINTS
    return max(1, points // freq_px.shape[0])


def _centre_rows(n: int, device) -> Tensor:
    """``(n + 1,)`` FFT-order row of each centred row, frequencies ``−n/2 … n/2``."""
    return torch.remainder(torch.arange(-(n // 2), n // 2 + 1, device=device), n)


def _centre(volume: Tensor) -> Tensor:
    """``(n, n, nh, …)`` FFT-layout map → ``(n + 1, n + 1, nh, …)`` centred copy."""
    rows = _centre_rows(volume.shape[0], volume.device)
    return volume.index_select(0, rows).index_select(1, rows)


def _fold(centred: Tensor, n: int) -> Tensor:
    """Adjoint of :func:`_centre` on ``(C, n + 1, n + 1, nh)``: → ``(C, n, n, nh)``, rows ``±n/2`` summed."""
    rows = _centre_rows(n, centred.device)
    c, _, _, nh = centred.shape
    half = centred.new_zeros(c, n, n + 1, nh).index_add_(1, rows, centred)
    return centred.new_zeros(c, n, n, nh).index_add_(2, rows, half)


def _axis_points(rotations: Tensor, freq_px: Tensor) -> Tensor:
    """:func:`slice_points` axis-major: ``(3, B · P)`` rows ``qx, qy, qz``, each contiguous.

    The same arithmetic as :func:`slice_points` (no matmul, which may run in TF32 on GPU).
    """
    row0, row1 = rotations[:, :2, :].permute(1, 2, 0)[..., None]  # (3, B, 1) each
    return (freq_px[:, 0] * row0 + freq_px[:, 1] * row1).reshape(3, -1)


def _nearest(interp: Interp) -> bool:
    if interp not in ("trilinear", "nearest"):
        raise ValueError(f"interpolation must be 'trilinear' or 'nearest', not {interp!r}")
    return interp == "nearest"


def _base_corner(q: Tensor, n: int, interp: Interp) -> tuple[Tensor, Tensor, Tensor]:
    """Lowest corner of the stencil of points ``q (3, …)`` = ``(qx, qy, qz)`` on the centred grid.

    Returns ``index (…)`` flat index of the corner in the centred ``(n + 1, n + 1, n // 2 + 1)``
    grid, ``frac (3, …)`` offsets of the points from it, ``sign (…)`` −1 where the point is
    read at ``−q`` (``qx < 0``). The corner is clamped to the grid so that invalid points
    (``|q| > n/2 − 1``) cannot address memory outside it.
    """
    nearest = _nearest(interp)
    h, nh = n // 2, n // 2 + 1
    sign = torch.where(q[0] < 0, -1.0, 1.0).to(q.dtype)
    q = q * sign
    corner = torch.floor(q + 0.5 if nearest else q).clamp_(-h, h if nearest else h - 1)
    x, y, z = corner.to(torch.int32).unbind(0)
    index = (z * (n + 1) + y) * nh + x + h * nh * (n + 2)
    return index, q - corner, sign


def _corner_offsets(n: int) -> list[int]:
    """Flat centred offsets of the 8 trilinear corners, ``dz`` slowest and ``dx`` fastest."""
    nh = n // 2 + 1
    return [dz * (n + 1) * nh + dy * nh + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def _stencil_flat(q: Tensor, n: int, interp: Interp) -> tuple[Tensor, Tensor | None, Tensor]:
    """Points ``q (3, N)`` → centred ``index (K, N)``, ``weight (K, N)`` (None for nearest), ``sign (N,)``.

    Trilinear weights are the outer product of ``(1 − f, f)`` over the axes, in
    :func:`_corner_offsets` order.
    """
    base, frac, sign = _base_corner(q, n, interp)
    if interp == "nearest":
        return base[None], None, sign
    offsets = torch.tensor(_corner_offsets(n), dtype=torch.int32, device=base.device)
    pair = frac[:, None, :] * frac.new_tensor([[-1.0], [1.0]]) + frac.new_tensor([[1.0], [0.0]])  # (3, 2, N)
    zy = pair[2, :, None, :] * pair[1, None, :, :]
    weight = (zy.reshape(4, 1, -1) * pair[0, None, :, :]).reshape(8, -1)
    return base + offsets[:, None], weight, sign


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
    index, weight, sign = _stencil_flat(points.reshape(-1, 3).T, n, interp)
    rows = _centre_rows(n, points.device)
    voxel = ((rows[:, None, None] * n + rows[None, :, None]) * nh + torch.arange(nh, device=points.device)).ravel()
    weight = torch.ones(index.shape, dtype=points.dtype, device=points.device) if weight is None else weight
    leading = points.shape[:-1]
    return voxel[index].T.reshape(*leading, -1), weight.T.reshape(*leading, -1), sign.reshape(leading)


def _extract_vectorised(centred_ri: Tensor, rotations: Tensor, freq_px: Tensor, interp: Interp) -> Tensor:
    """Kernel on real views: ``(n + 1, n + 1, nh, C, 2)`` centred maps → ``(B, P, C, 2)`` (real,
    imaginary) values of each of the C maps."""
    n, channels = centred_ri.shape[0] - 1, centred_ri.shape[3]
    flat = centred_ri.reshape(-1, channels, 2)
    out = centred_ri.new_empty(rotations.shape[0], freq_px.shape[0], channels, 2)
    chunk = _chunk_images(freq_px, _EAGER_CHUNK_POINTS // channels)
    for start in range(0, rotations.shape[0], chunk):
        index, weight, sign = _stencil_flat(_axis_points(rotations[start:start + chunk], freq_px), n, interp)
        values = flat.index_select(0, index.reshape(-1)).view(*index.shape, channels, 2)
        if weight is not None:
            values = (weight[..., None, None] * values).sum(0)
        else:
            values = values[0]
        values[..., 1] *= sign[:, None]
        out[start:start + chunk] = values.view(-1, freq_px.shape[0], channels, 2)
    return out


def _corner_weights(frac: Tensor) -> list[Tensor]:
    """The 8 trilinear weights of :func:`_stencil_flat`, one tensor per corner (same arithmetic)."""
    fx, fy, fz = frac.unbind(0)
    return [wz * wy * wx for wz in (1 - fz, fz) for wy in (1 - fy, fy) for wx in (1 - fx, fx)]


def _extract_corners(centred_ri: Tensor, rotations: Tensor, freq_px: Tensor, interp: Interp) -> Tensor:
    """:func:`_extract_vectorised` corner by corner, for ``torch.compile`` to fuse into one loop.

    Compiled, it runs about 1.7x faster than the compiled vectorised form (no (8, B · P) buffers).
    """
    n, channels = centred_ri.shape[0] - 1, centred_ri.shape[3]
    base, frac, sign = _base_corner(slice_points(rotations, freq_px).movedim(-1, 0), n, interp)
    flat = centred_ri.reshape(-1, channels, 2)
    flip = torch.stack([torch.ones_like(sign), sign], -1)[..., None, :]  # (B, P, 1, 2)
    if interp == "nearest":
        return flat[base] * flip
    value = 0.0
    for offset, w in zip(_corner_offsets(n), _corner_weights(frac)):
        value = value + w[..., None, None] * flat[base + offset]
    return value * flip


def _insert_vectorised(out: Tensor, channels: tuple[Tensor, ...], rotations: Tensor, freq_px: Tensor, n: int,
                       interp: Interp, conjugate: tuple[bool, ...], powers: tuple[int, ...]) -> None:
    """Kernel: adds ``(B, P)`` real channels into the ``(C, (n + 1)² · nh)`` centred maps ``out``.

    Channel c is multiplied by the flip sign where ``conjugate[c]`` (imaginary parts) and
    scattered with the interpolation weights to the power ``powers[c]``, by ``index_add_`` on
    each flat channel (several times faster on CPU than one ``index_add_`` over rows of C).
    """
    chunk = _chunk_images(freq_px, _EAGER_CHUNK_POINTS)
    for start in range(0, rotations.shape[0], chunk):
        index, weight, sign = _stencil_flat(_axis_points(rotations[start:start + chunk], freq_px), n, interp)
        index = index.reshape(-1)
        for target, values, flip, p in zip(out, channels, conjugate, powers):
            values = values[start:start + chunk].reshape(-1)
            values = values * sign if flip else values
            if weight is not None:
                values = ((weight if p == 1 else weight**p) * values).reshape(-1)
            target.index_add_(0, index, values)


def _insert_corners(out: Tensor, channels: tuple[Tensor, ...], rotations: Tensor, freq_px: Tensor, n: int,
                    interp: Interp, conjugate: tuple[bool, ...], powers: tuple[int, ...]) -> None:
    """:func:`_insert_vectorised` corner by corner and in one ``index_add_``, for ``torch.compile``.

    Compiled, the stencil, weights and scatter fuse into one loop, 1.2-1.4x faster (box 64-128)
    than the vectorised form with its (8, B · P) buffers compiled.
    """
    base, frac, sign = _base_corner(slice_points(rotations, freq_px).movedim(-1, 0), n, interp)
    flipped = [values * sign if flip else values for values, flip in zip(channels, conjugate)]
    if interp == "nearest":
        out.index_add_(1, base.reshape(-1), torch.stack(flipped).reshape(len(flipped), -1))
        return
    index = torch.stack([base + offset for offset in _corner_offsets(n)], -1).reshape(-1)
    weight = torch.stack(_corner_weights(frac), -1)
    terms = [(weight**p * values[..., None]).reshape(-1) for values, p in zip(flipped, powers)]
    out.index_add_(1, index, torch.stack(terms))


_extract_kernel = maybe_compile(_extract_vectorised, _extract_corners)
_insert_kernel = maybe_compile(_insert_vectorised, _insert_corners, on_cpu=False)  # the CPU's is native.scatter


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
    return extract_many(volume_ft[None], rotations, freq_px, interp)[0]


def extract_many(volumes_ft: Tensor, rotations: Tensor, freq_px: Tensor, interp: Interp = "trilinear") -> Tensor:
    """:func:`extract` of ``(C, n, n, nh)`` maps at once → ``(C, B, P)``: one stencil per point
    for all C maps, whose values it reads side by side (channel-last)."""
    centred = _centre(torch.view_as_real(volumes_ft).movedim(0, -2))
    if native.available(centred, rotations):
        values = native.gather(centred, rotations, freq_px, _nearest(interp))
    else:
        values = _extract_kernel(centred, rotations, freq_px, interp)
    return torch.view_as_complex(values).movedim(-1, 0)


def insert(values: Tensor, rotations: Tensor, freq_px: Tensor, shape: tuple[int, int, int],
           interp: Interp = "trilinear") -> Tensor:
    """Exact adjoint of :func:`extract`: back-project ``(B, P)`` values into a ``shape`` half-grid."""
    maps, _ = insert_many(values[None], None, rotations, freq_px, shape, interp)
    return maps[0]


def insert_many(values: Tensor | None, real: Tensor | None, rotations: Tensor, freq_px: Tensor,
                shape: tuple[int, int, int], interp: Interp = "trilinear", powers: tuple[int, ...] = (2,),
                source: Tensor | None = None, scale: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Several back-projections sharing one stencil per chunk of points.

    Args:
        values: ``(K, B, P)`` complex values, each back-projected as by :func:`insert`, or None.
        real: ``(B, P)`` real values, scattered once with the interpolation weights to each of
            ``powers``, or None. Applied to ``c²``, power 2 gives the diagonal of
            ``Σ Pᵀ diag(c²) P`` (the exact Hessian diagonal) and power 1 its row sums, the
            same matrix applied to the all-ones map (trilinear weights sum to 1).
        source, scale: ``(R,)``: slice r of ``rotations (R, 3, 3)`` back-projects the values of
            image ``source[r]`` (B images; without ``source``, image r, and B = R) times
            ``scale[r]`` (1 without). Poses of one image then share its values, unrepeated.

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
    n, _, nh = shape
    out = channels[0].new_zeros(len(channels), (n + 1) * (n + 1) * nh)
    if native.available(out, rotations, *channels, powers=tuple(scatter_powers)):
        native.scatter(out, torch.stack(channels), rotations, freq_px, n, _nearest(interp), tuple(conjugate),
                       tuple(scatter_powers), source, scale)
    else:
        chunk = _chunk_images(freq_px, _SCATTER_CHUNK_POINTS)
        for start in range(0, len(rotations), chunk):
            rows = slice(start, start + chunk)
            picked = tuple(c[rows] if source is None else c[source[rows]] for c in channels)
            picked = picked if scale is None else tuple(c * scale[rows, None].to(c.dtype) for c in picked)
            _insert_kernel(out, picked, rotations[rows], freq_px, n, interp, tuple(conjugate), tuple(scatter_powers))
    out = _fold(out.reshape(-1, n + 1, n + 1, nh), n)
    complex_channels = 0 if values is None else 2 * len(values)
    maps = None if values is None else torch.view_as_complex(
        out[:complex_channels].reshape(len(values), 2, *shape).movedim(1, -1).contiguous())
    return maps, (None if real is None else out[complex_channels:])


def apodization(box_px: int, interp: Interp, pad: int = 1, dtype=torch.float64) -> Tensor:
    """``(n,)`` real-space profile that Fourier-space interpolation multiplies a map by, per axis.

    Slicing a map's Fourier transform, sampled on a ``pad·n`` grid, by trilinear (nearest)
    interpolation is slicing that of ``v · sinc²(x / (pad·n))`` (``sinc``), x from the box
    centre. :func:`cryosgd.sim.project.oversampled_ft` divides by it before projecting;
    a reconstruction's map is multiplied by it (the gridding correction).
    """
    x = (torch.arange(box_px, dtype=dtype) - box_px // 2) / (pad * box_px)
    return torch.sinc(x) ** (2 if interp == "trilinear" else 1)
