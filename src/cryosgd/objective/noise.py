"""The noise model: a spectrum σ_g²(s) per optics group g, estimated from residuals.

Image pixel k of the half-disc lies in 2-D shell s = round(|k|) (Fourier-index units of the
original box). σ_g²(s) is the mean of |y_i(k) − (S_i x)(k)|² over the images i of group g
and the shell's pixels: the variance of a complex Fourier coefficient of the noise, in the
units of the images' rfft2 (RELION's sigma2_noise holds half of it, per real part). With x
a regularised map of the same data, the residual is the noise plus the part of the signal
x misses, which is small beside the noise wherever single images have low SNR (everywhere
but the lowest shells, where σ² comes out somewhat high: up to 20 % in a test whose quieter
group has single-image SNR near 1 there).

The objective weights pixel k of an image of group g by w_g(k) = 1/σ_g²(s(k)), all scaled
so that their mean over the groups and the full disc is 1: λ and Algorithm 1's threshold α
keep their meaning, and white noise of equal level in every group gives w = 1. With one
group the weight hardly moves the least-squares map (a voxel's data all lie near one
radius); it matters where groups differ in noise, and for the prior's balance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryosgd.data.batch import Batch
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid
from cryosgd.objective.loss import LeastSquares


def residual_power(objective: LeastSquares, x: Tensor, batch: Batch, n_groups: int) -> tuple[Tensor, Tensor]:
    """Per optics group, the sum over the batch's images of their per-shell mean |y − S x|², and
    the image counts, both weighted by the rows' weights: ``(n_groups, n_shells)`` and
    ``(n_groups,)`` float64 (sums, so that the parts of a batch split across processes add up)."""
    r = objective.residual(x, batch)
    shells = objective.model.grid.shell_px.to(r.device)
    per_pixel = (r.real.square() + r.imag.square()).double()  # (B, P)
    per_shell = per_pixel.new_zeros(len(batch), int(shells.max()) + 1).index_add_(1, shells, per_pixel)
    per_shell = per_shell / torch.bincount(shells).to(per_shell)
    rows = torch.ones(len(batch), dtype=torch.float64, device=r.device)
    rows = rows if batch.weight is None else rows * batch.weight.to(rows)
    groups = batch.groups(r.device)
    sums = per_shell.new_zeros(n_groups, per_shell.shape[1]).index_add_(0, groups, per_shell * rows[:, None])
    return sums, torch.bincount(groups, rows, minlength=n_groups)


def spectra(sums: Tensor, counts: Tensor, names: list[str]) -> Tensor:
    """``(G, n_shells)`` σ_g² from summed residual powers and counts; a group without images
    gets the mean spectrum of the others (it is never used)."""
    mean = sums.sum(0) / counts.sum()
    sigma2 = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1e-300)[:, None], mean)
    bad = torch.nonzero(~(sigma2 > 0))
    if len(bad):
        g, s = (int(v) for v in bad[0])
        raise InputError(None, f"--noise estimate: optics group {names[g]} has no residual power in shell {s} "
                               "(noise-free images?); use --noise white")
    return sigma2


def noise_weight(sigma2: Tensor, grid: FourierGrid) -> Tensor:
    """``(G, P)`` w_g(k) = 1/σ_g²(s(k)), scaled to mean 1 over the groups and the full disc."""
    shells = grid.shell_px.to(sigma2.device)
    weight = 1.0 / sigma2.double()[:, shells]
    multiplicity = grid.multiplicity.to(weight)
    return weight * multiplicity.sum() * len(weight) / (weight * multiplicity).sum()
