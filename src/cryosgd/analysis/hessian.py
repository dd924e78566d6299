"""The Hessian of the known-pose loss: its diagonal, radial profile and condition numbers.

H is normalised as the mean over images (PAPER.md §2.3), plus λI. Reported values are per
full-grid voxel, the paper's normalisation: a half-grid voxel with 0 < kx < n/2 stands for
the voxels k and −k, so the full-grid entry is its diagonal divided by m₃ = 2; on the planes
kx = 0 and kx = n/2 the entries of k and −k are averaged (a real map ties them together).

κ(R) is computed on the ball of the first R RELION shells, |k| < R − ½ (voxel units,
R = 1 … n/2 − 1), as the paper's figures (x value r, radius r − ½). Voxels nearer to the
disc's edge get fewer hits, from one side only, and would make κ track lattice accidents. A voxel of the ball
that no image samples keeps H = λ, so κ ≈ max H / λ there: it is reported, not hidden.
The bound (1 + λ)/(p + λ), p = n₂(R)/n₃(R) (pixels in the disc over voxels in the ball), is
the paper's lower bound for nearest-neighbour interpolation without CTF.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from cryosgd.analysis.lanczos import Extremes, lanczos
from cryosgd.fourier.grids import voxel_multiplicity


def _mirror(plane: Tensor) -> Tensor:
    """``plane[..., (−z) mod n, (−y) mod n]`` for ``(..., n, n)`` planes."""
    return torch.roll(torch.flip(plane, (-2, -1)), (1, 1), (-2, -1))


def hermitian(x: Tensor) -> Tensor:
    """Orthogonal projection of a half-grid map onto the transforms of real maps.

    Only the planes kx = 0 and kx = n/2 hold both k and −k; there x(k) and conj x(−k) are
    averaged. Works on stacks ``(..., n, n, nh)``.
    """
    out = x.clone()
    for p in (0, x.shape[-1] - 1):
        plane = x[..., p]
        out[..., p] = 0.5 * (plane + _mirror(plane).conj())
    return out


def full_grid(diagonal: Tensor) -> Tensor:
    """Half-grid diagonal ``(n, n, nh)`` → per-voxel full grid ``(n, n, n)`` in FFT order."""
    n = diagonal.shape[0]
    half = hermitian(diagonal / voxel_multiplicity(diagonal.shape, diagonal.device, diagonal.dtype))
    full = diagonal.new_zeros(n, n, n)
    full[..., :n // 2 + 1] = half
    full[..., n // 2 + 1:] = _mirror(half[..., 1:n // 2].movedim(-1, 0)).movedim(0, -1).flip(-1)
    return full


def radius_px(n: int, device=None) -> Tensor:
    """``(n, n, n)`` |k| in voxel units, FFT order."""
    k = torch.fft.fftfreq(n, 1 / n, dtype=torch.float64, device=device)
    return torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)


def radial_profile(full: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, min and max of a full-grid map over the shells round(|k|) = 0 … n/2 − 1."""
    n = full.shape[0]
    shells = torch.round(radius_px(n, full.device)).long().flatten()
    values = full.flatten().double()
    inside = shells < n // 2
    shells, values = shells[inside], values[inside]
    mean = torch.bincount(shells, values, n // 2) / torch.bincount(shells, minlength=n // 2)
    low = values.new_full((n // 2,), np.inf).scatter_reduce(0, shells, values, "amin")
    high = values.new_full((n // 2,), -np.inf).scatter_reduce(0, shells, values, "amax")
    return mean, low, high


def kappa_of_diagonal(full: Tensor, radii: Tensor) -> Tensor:
    """max/min of a full-grid diagonal over each ball |k| < R − ½ (``radii`` in voxel units)."""
    radius = radius_px(full.shape[0], full.device).flatten()
    values = full.flatten().double()
    order = torch.argsort(radius)
    radius, values = radius[order], values[order]
    last = torch.searchsorted(radius, radii.to(radius) - 0.5 - 1e-9) - 1
    return torch.cummax(values, 0).values[last] / torch.cummin(values, 0).values[last]


def kappa_bound(radii: Tensor, l2: float) -> Tensor:
    """(1 + λ)/(p + λ), p = #pixels |k| ≤ R over #voxels |k| ≤ R."""
    r_max = int(radii.max())
    k = torch.arange(-r_max, r_max + 1, dtype=torch.float64)
    r2 = k[:, None] ** 2 + k[None, :] ** 2
    r3 = r2[None] + k[:, None, None] ** 2
    n2 = torch.stack([(r2 <= r**2 + 1e-9).sum() for r in radii.double()]).double()
    n3 = torch.stack([(r3 <= r**2 + 1e-9).sum() for r in radii.double()]).double()
    return (1 + l2) / (n2 / n3 + l2)


class RestrictedHessian:
    """``x (K, n, n, nh) ↦ B_K P S H S P B_K x``: H in the variables ``S⁻¹ x`` of real maps,
    restricted to the balls |k| < R_K − ½ (P: :func:`hermitian`; B and P commute since k and −k
    share |k|).

    ``hvp`` applies H to a stack of maps (over all the data). ``scale`` S is ``m₃^{-1/2}`` for
    H in the full-grid normalisation, or ``(diag H)^{-1/2}`` for the diagonally preconditioned
    D⁻¹H (similar to D^{-1/2} H D^{-1/2}).
    """

    def __init__(self, hvp: Callable[[Tensor], Tensor], radii: Tensor, scale: Tensor):
        self.hvp, self.scale = hvp, scale
        n = scale.shape[0]
        shells = radius_px(n, scale.device)[..., : n // 2 + 1]
        self.balls = (shells[None] < radii.to(scale.device)[:, None, None, None] - 0.5 - 1e-9).to(scale.dtype)

    def restrict(self, x: Tensor) -> Tensor:
        return hermitian(self.balls * x)

    def __call__(self, x: Tensor) -> Tensor:
        z = self.restrict(x) * self.scale
        return self.restrict(self.scale * self.hvp(z))

    def extremes(self, iterations: int, seed: int = 0) -> Extremes:
        """Lanczos estimates of the extreme eigenvalues, one per ball, from random starts."""
        generator = torch.Generator().manual_seed(seed)
        dtype = torch.promote_types(self.scale.dtype, torch.complex64)
        start = torch.randn(self.balls.shape, generator=generator, dtype=dtype).to(self.scale.device)
        return lanczos(self, self.restrict(start), iterations)
