"""The diagonal of the Hessian: exactly (one scatter) and by Hutchinson's estimator.

Exact: diag(H_B)_v = (1/|B|) Σ_i Σ_k m(k) w(k) c_i(k)² P_i(k, v)² + λ m₃(v), where P_i(k, v)
are the interpolation weights: one scatter of squared weights times CTF². For nearest
neighbour H is diagonal and this is all of H. The entry is the same for the real and the
imaginary part of a voxel, so diagonals are real tensors of the map's shape.

Hutchinson: E[z ⊙ H z] = diag(H) for Rademacher z. Here z has independent ±1 real and
imaginary parts, and the two products Re z·Re(Hz), Im z·Im(Hz) are averaged: two probes
of the real Hessian for the price of one H·z.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryosgd.data.batch import Batch
from cryosgd.fourier.grids import shell_index, voxel_multiplicity
from cryosgd.objective.loss import LeastSquares, count


def exact_diagonal(objective: LeastSquares, batch: Batch, dtype=torch.float32) -> Tensor:
    """diag(H_B) for a batch held whole (mean over its images, ridge included)."""
    return exact_diagonal_sum(objective, batch, dtype) / count(batch) + objective.ridge_diagonal(
        objective.model.volume_shape, batch.rotations.device, dtype)


def exact_diagonal_sum(objective: LeastSquares, batch: Batch, dtype=torch.float32) -> Tensor:
    """The data part of diag(H_B) as a sum over the batch's images: one scatter."""
    like = batch.rotations.new_zeros((len(batch), len(objective.model.grid.freq_px)), dtype=dtype)
    weight = objective.pixel_weight(batch, like).expand(like.shape)
    _, scattered = objective.model.back_project(batch, curvature=weight)
    return scattered[0]


def shell_means(diagonal: Tensor) -> Tensor:
    """Mean of ``diagonal / m₃`` over each RELION shell (index = rounded radius), ``(n_shells,)``.

    The curvature per full-grid voxel averaged over a shell: the scale of a per-shell ridge.
    """
    shells = shell_index(diagonal.shape[0], diagonal.device).reshape(-1)
    per_voxel = (diagonal / voxel_multiplicity(diagonal.shape, diagonal.device, diagonal.dtype)).reshape(-1)
    return torch.bincount(shells, per_voxel.double()) / torch.bincount(shells).clamp(min=1)


def rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype=torch.complex64, device=None) -> Tensor:
    """A complex probe whose real and imaginary parts are independent ±1."""
    real_dtype = torch.empty((), dtype=dtype).real.dtype
    signs = torch.randint(0, 2, (*shape, 2), generator=generator, device=device).to(real_dtype) * 2 - 1
    return torch.view_as_complex(signs)


def hutchinson_probe(objective: LeastSquares, batch: Batch, z: Tensor) -> Tensor:
    """One unbiased estimate of diag(H_B) from one H·z (real, the map's shape)."""
    return probe_estimate(z, objective.hvp(z, batch))


def probe_estimate(z: Tensor, hz: Tensor) -> Tensor:
    """The estimate z ⊙ Hz, averaged over the real and the imaginary probe."""
    return 0.5 * (z.real * hz.real + z.imag * hz.imag)
