"""Shift grids and their phase ramps.

Shifts are RELION origins in Å (``rlnOriginXAngst``, ``rlnOriginYAngst``), as in
:mod:`cryosgd.conventions`: a predicted image is ``CTF · exp(+2πi k · origin) · slice``.
:func:`phase_ramps` is :func:`cryosgd.conventions.shift_phase` with leading batch
dimensions, so the sign convention lives in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cryosgd.conventions import shift_phase


def shift_grid(max_shift_A: float, step_A: float, centre_A: Tensor | Sequence[float] | None = None,
               dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Square grid of origins with spacing ``step_A``, clipped to a disc of ``max_shift_A``.

    Args:
        max_shift_A: disc radius in Å; 0 gives the centre alone.
        step_A: grid spacing in Å (> 0).
        centre_A: ``(..., 2)`` centre(s) ``(x, y)`` in Å; default the origin ``(0, 0)``.

    Returns:
        ``(T, 2)`` origins ``(x, y)`` in Å, or ``(..., T, 2)`` for batched centres; row-major in
        ``(y, x)``; the centre itself is always in the grid.
    """
    if step_A <= 0 or max_shift_A < 0:
        raise ValueError(f"shift grid: step {step_A} Å must be > 0 and range {max_shift_A} Å ≥ 0")
    n = math.floor(max_shift_A / step_A + 1e-9)
    steps = torch.arange(-n, n + 1, dtype=dtype, device=device)
    y, x = torch.meshgrid(steps, steps, indexing="ij")
    keep = x**2 + y**2 <= (max_shift_A / step_A) ** 2 + 1e-9
    offsets = torch.stack([x[keep], y[keep]], -1) * step_A
    if centre_A is None:
        return offsets
    centre_A = torch.as_tensor(centre_A, dtype=dtype, device=device)
    return centre_A[..., None, :] + offsets.to(centre_A.device)


def local_shift_grid(centres_A: Tensor, step_A: float) -> Tensor:
    """``(N, 2)`` centres → ``(N, 9, 2)`` origins ``centre + step_A · {−1, 0, 1}²`` (centre at index 4)."""
    steps = torch.tensor([-1.0, 0.0, 1.0], dtype=centres_A.dtype, device=centres_A.device)
    y, x = torch.meshgrid(steps, steps, indexing="ij")
    return centres_A[..., None, :] + step_A * torch.stack([x.reshape(-1), y.reshape(-1)], -1)


def phase_ramps(freq_invA: Tensor, shifts_A: Tensor) -> Tensor:
    """Phase factors ``exp(+2πi k · t)`` for every shift (see :func:`cryosgd.conventions.shift_phase`).

    Args:
        freq_invA: ``(P, 2)`` image frequencies ``(kx, ky)`` in Å⁻¹.
        shifts_A: ``(..., T, 2)`` origins ``(x, y)`` in Å.

    Returns:
        ``(..., T, P)`` complex, in the precision of the wider of the two real dtypes.
    """
    flat = shifts_A.reshape(-1, 2).to(torch.promote_types(shifts_A.dtype, freq_invA.dtype))
    return shift_phase(freq_invA.to(flat.dtype), flat).reshape(*shifts_A.shape[:-1], freq_invA.shape[0])
