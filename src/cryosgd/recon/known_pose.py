"""Known-pose reconstruction of one half-set by (preconditioned) SGD or CG.

The map is the rfft half-grid of the working box. One pass over the data (epoch 0) scatters
b = S*y and the data terms of diag(H) and of H·1 together; the one-pass map b / (H·1 + ridge),
RELION's reconstruction up to its gridding iterations, is where the SGD methods start
(``start="backprojection"``; ``"zero"`` is the paper's start). CG starts from zero: its first
iterate is already the best multiple of that map. An epoch visits every particle of the
half-set once in a random order drawn from (seed, half, epoch), and its probes from
(seed, half, epoch, 1), so a run resumed from an epoch checkpoint repeats exactly what an
uninterrupted run does, and so does a run on any number of processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from cryosgd import dist
from cryosgd.data.batch import Batch, WeightedRows
from cryosgd.fourier.grids import shell_index, voxel_multiplicity
from cryosgd.objective.diagonal import shell_means
from cryosgd.objective.loss import DataTerms, LeastSquares, count
from cryosgd.objective.noise import residual_power
from cryosgd.optim.base import Step, inner
from cryosgd.recon.halves import HalfSet
from cryosgd.recon.methods import cg_optimizer, sgd_optimizer


@dataclass(frozen=True)
class HalfState:
    """Everything about one half-set after an epoch (what a checkpoint stores).

    Attributes:
        epoch: the last finished epoch (0: the first pass).
        x: ``(n, n, n//2+1)`` complex map.
        terms: the half's data terms, means over its images (:class:`DataTerms`).
        sigma2: ``(G, shells)`` the noise spectrum σ² per optics group and image shell, or None
            (white noise, σ = 1).
        shell_weight: ``(shells,)`` w̄, the shell means of the density H·1.
        ridge: ``(n, n, n//2+1)`` λ_v, the per-voxel ridge (floor and Wiener prior).
        wiener: the Wiener part of ``ridge``.
        optimizer: the optimiser's state (a chain's tuple, a :class:`CGState`), None before the prior.
    """

    epoch: int
    x: Tensor
    terms: DataTerms
    sigma2: Tensor | None
    shell_weight: Tensor
    ridge: Tensor
    wiener: Tensor
    optimizer: object = None


def objective_of(half: HalfSet, state: HalfState) -> LeastSquares:
    return LeastSquares(half.model, state.ridge, half.noise_weight(state.sigma2))


Rows = Callable[[Batch, Tensor], Batch | WeightedRows]
"""``rows(batch, x)``: the rows to fit for a batch of images, given the current map ``x``: the
batch itself for known poses; (image, pose) rows with posterior weights when poses are searched
(a minibatch step needs them as a :class:`Batch`, a pass's data terms take either)."""


def _known_poses(batch: Batch, x: Tensor) -> Batch:
    return batch


def data_terms(half: HalfSet, sigma2: Tensor | None = None, on_batch: Callable[[], None] = lambda: None,
               rows: Rows = _known_poses, x: Tensor | None = None) -> DataTerms:
    """The half's :class:`DataTerms` (means over its images) under the noise spectrum ``sigma2``,
    in one pass; ``rows`` (given the map ``x``) turns each batch into the rows to fit. diag(H)
    only for the methods that use it (:func:`exact_diagonal_of`)."""
    objective = LeastSquares(half.model, 0.0, half.noise_weight(sigma2))
    diagonal = half.settings.uses_exact_diagonal

    def sums(batch):
        terms = objective.data_terms(rows(batch, x), diagonal)
        return terms.c, terms.b, terms.density, *((terms.diagonal,) if diagonal else ())

    c, b, density, *diagonal_mean = half.pass_mean(sums, on_batch)
    return DataTerms(c, b, diagonal_mean[0] if diagonal else None, density)


def initial_state(half: HalfSet, terms: DataTerms, sigma2: Tensor | None) -> HalfState:
    """The state after the first pass, before any prior: a zero map and the floor ridge."""
    zero = torch.zeros((), dtype=half.dtype, device=half.device)
    state = HalfState(0, half.zeros(), terms, sigma2, shell_means(terms.density), zero, zero)
    return with_prior(half, state, ssnr=None)


def one_pass_map(half: HalfSet, state: HalfState) -> Tensor:
    """b / (H·1 + ridge): the data's back-projection over their density, as RELION divides by
    its weights before the gridding iterations. It is the least-squares map where the map is
    smooth on the voxel scale (and exactly for nearest, where H = diag(H) = H·1); dividing by
    diag(H) instead would inflate trilinear maps about 3.5× (E Σ w² = (2/3)³ of (Σ w)² = 1)."""
    ridge = objective_of(half, state).ridge_diagonal(state.x.shape, state.x.device, half.dtype)
    return state.terms.b / (state.terms.density + ridge)


def exact_diagonal_of(half: HalfSet, state: HalfState) -> Tensor | None:
    """diag(H) = data diagonal + ridge, for the methods that use it; else None."""
    if not half.settings.uses_exact_diagonal:
        return None
    return state.terms.diagonal + objective_of(half, state).ridge_diagonal(state.x.shape, state.x.device, half.dtype)


def with_prior(half: HalfSet, state: HalfState, ssnr: Tensor | None) -> HalfState:
    """Set the per-voxel ridge λ + w̄(shell) · (shell_ridge + 1/SSNR(shell)) and what depends on it.

    ``w̄`` is the shell mean of the data density H·1 (RELION's summed weights) and SSNR =
    FSC/(1 − FSC) of the half maps (RELION's τ² = SSNR / w̄), floored at 1e-3; ``ssnr=None``
    leaves the floor ridge only. Before the first epoch, the SGD methods' start map and optimiser
    state are set under the new ridge. A full-batch method restarts CG on the new system; its
    residual r = b − Hx changes by exactly −(R_new − R_old)·x, so no pass over the data is needed.
    """
    s, x = half.settings, state.x
    shells = shell_index(x.shape[0], x.device)
    inverse_ssnr = 0.0 if ssnr is None else 1.0 / ssnr_per_shell(ssnr, len(state.shell_weight))
    wiener = (state.shell_weight * inverse_ssnr)[shells].to(half.dtype)
    ridge = (s.l2 + (state.shell_weight * s.shell_ridge)[shells]).to(half.dtype) + wiener
    new = replace(state, ridge=ridge, wiener=wiener)
    diagonal = exact_diagonal_of(half, new)
    if s.full_batch:
        residual = state.terms.b if state.optimizer is None else state.optimizer.r
        multiplicity = voxel_multiplicity(x.shape, x.device, half.dtype)
        return replace(new, optimizer=cg_optimizer(s, diagonal).init(residual - (ridge - state.ridge) * multiplicity * x))
    if state.epoch > 0:
        return new
    x = one_pass_map(half, new) if s.start == "backprojection" else half.zeros()
    return replace(new, x=x, optimizer=sgd_optimizer(s, half.grid.work_box_px, diagonal).init(x))


def ssnr_per_shell(ssnr: Tensor, n_shells: int) -> Tensor:
    """SSNR padded with zeros to ``n_shells`` (corner shells beyond Nyquist), floored at 1e-3."""
    out = torch.zeros(n_shells, dtype=torch.float64, device=ssnr.device)
    known = min(len(ssnr), n_shells)
    out[:known] = torch.nan_to_num(ssnr[:known].double(), nan=0.0)
    return out.clamp(min=1e-3)


def run_epoch(half: HalfSet, state: HalfState, epoch: int, on_batch: Callable[[], None] = lambda: None,
              rows: Rows = _known_poses) -> tuple[HalfState, dict]:
    """One epoch (one iteration for ``cg``/``pcg``): the new state and the epoch's metrics.

    ``rows`` turns each minibatch into the rows to fit against the current map (poses searched
    on the minibatch, :mod:`cryosgd.recon.refine`); CG takes the batches as they are.

    The reported loss is that of the SGD steps' batches, each at the map before its step (their
    mean over the epoch, no extra pass); for CG it is f at the new map, from CG's own vectors.
    """
    start = time.perf_counter()
    steps = list(epoch_steps(half, state, epoch, on_batch, rows))
    return steps[-1][0], epoch_metrics(half, state, steps, time.perf_counter() - start)


def epoch_steps(half: HalfSet, state: HalfState, epoch: int, on_batch: Callable[[], None] = lambda: None,
                rows: Rows = _known_poses) -> Iterator[tuple[HalfState, dict]]:
    """The state after each step of an epoch (one for ``cg``/``pcg``) and the step's loss
    (sum over its images), image count and step size: a caller may stop between steps."""
    if half.settings.full_batch:
        x, optimizer, loss, step_size = _cg_epoch(half, state, epoch, on_batch)
        yield replace(state, epoch=epoch, x=x, optimizer=optimizer), {"loss": loss, "images": 1.0,
                                                                      "step_size": step_size}
        return
    objective = objective_of(half, state)
    optimizer = sgd_optimizer(half.settings, half.grid.work_box_px, exact_diagonal_of(half, state))
    seed = int(np.random.default_rng([half.settings.seed, half.half, epoch, 1]).integers(2**62))
    generator = torch.Generator(device=state.x.device).manual_seed(seed)
    x, opt_state = state.x, state.optimizer
    for i, batch in enumerate(half.parts(epoch)):
        z = optimizer.probe(opt_state, generator)
        step, loss, images = minibatch_step(objective, rows(batch, x), x, z, i == 0, optimizer.wants_diagonal)
        update, opt_state, info = optimizer.update(step.gradient, opt_state, step)
        x = x + update
        on_batch()
        yield replace(state, epoch=epoch, x=x, optimizer=opt_state), {"loss": loss * images, "images": images,
                                                                      "step_size": info["step_size"]}


def epoch_metrics(half: HalfSet, before: HalfState, steps: list[tuple[HalfState, dict]], seconds: float) -> dict:
    """An epoch's metrics row from its steps (all of them, or those run before a stop)."""
    after, infos = steps[-1][0], [info for _, info in steps]
    change = (after.x - before.x).norm() / after.x.norm().clamp(min=1e-30)
    return {"epoch": after.epoch, "half": half.half, "loss": sum(i["loss"] for i in infos) / sum(i["images"] for i in infos),
            "step_size": float(np.median([i["step_size"] for i in infos])), "steps": len(infos),
            "map_change": float(change), "seconds": seconds}


def minibatch_step(objective: LeastSquares, batch, x: Tensor, z: Tensor | None, new_epoch: bool,
                   diagonal: int | None = None):
    """One batch's loss, gradient, H·z and (``diagonal`` = 2) its exact diag(H) or (= 1) H·1,
    summed over all processes' shares: (Step, loss, |B|)."""
    sums = objective.data_gradients(x, batch, z, diagonal)
    optional = [t for t in (sums.hz, sums.diagonal) if t is not None]
    loss, gradient, *rest, images = dist.all_reduce_sums(sums.loss, sums.gradient, *optional, count(batch))
    images = float(images)
    hz = None if z is None else rest.pop(0) / images + objective.ridge_gradient(z)
    exact = None if diagonal is None else rest.pop(0) / images + objective.ridge_diagonal(x.shape, x.device,
                                                                                         x.real.dtype)

    def curvature(p: Tensor) -> float:  # ⟨p, H p⟩ = Σ_i |S_i p|²_w / |B| + ⟨p, R p⟩
        data, = dist.all_reduce_sums(objective.data_curvature(p, batch))
        return float(data) / images + 2 * float(objective.ridge_loss(p))

    step = Step(gradient / images + objective.ridge_gradient(x), z, hz, curvature, new_epoch, exact)
    return step, float(loss) / images + float(objective.ridge_loss(x)), images


def _cg_epoch(half: HalfSet, state: HalfState, epoch: int, on_batch):
    objective = objective_of(half, state)

    def full_hvp(p: Tensor) -> Tensor:
        data, = half.pass_mean(lambda batch: (objective.data_hvp(p[None], batch)[0],))
        return data + objective.ridge_gradient(p)

    x, opt_state, info = cg_optimizer(half.settings, exact_diagonal_of(half, state)).update(
        state.x, state.optimizer, full_hvp)
    on_batch()
    loss = float(state.terms.c) - 0.5 * inner(x, state.terms.b + opt_state.r)  # f = c − ½⟨x, b + r⟩
    return x, opt_state, loss, info["step_size"]


def joint_map(halves: list[HalfSet], states: list[HalfState]) -> Tensor:
    """The map of all particles from the half maps, as a joint solve in the diagonal approximation.

    Half i (N_i images) solves N_i(D_i + R_i + W_i) x_i ≈ N_i b_i, with D_i its data density
    H·1, R_i its ridge per image (λ and the floor) and N_i W_i = 1/τ² its Wiener prior (the
    same signal prior whatever N_i). All particles solve (Σ N_i (D_i + R_i) + 1/τ²) x = Σ N_i b_i:
    x = Σ N_i (D_i + R_i + W_i) x_i / Σ N_i (D_i + R_i + ½ W_i), a curvature-weighted mean of
    the halves with half their Wiener regularisation. Exact where H is diagonal (nearest
    interpolation) and for the one-pass maps.
    """
    numerator, denominator = 0.0, 0.0
    for h, s in zip(halves, states):
        multiplicity = voxel_multiplicity(s.x.shape, s.x.device, h.dtype)
        numerator = numerator + len(h) * (s.terms.density + s.ridge * multiplicity) * s.x
        denominator = denominator + len(h) * (s.terms.density + (s.ridge - 0.5 * s.wiener) * multiplicity)
    return numerator / denominator


def residual_powers(half: HalfSet, x: Tensor) -> tuple[Tensor, Tensor]:
    """Residual power against ``x`` per optics group and image shell, summed over the half's
    images, and the image counts per group (:func:`~cryosgd.objective.noise.residual_power`)."""
    objective = LeastSquares(half.model, 0.0)
    groups = len(half.table.optics)
    sums, counts = half.pass_mean(lambda batch: residual_power(objective, x, batch, groups))
    return sums * len(half), counts * len(half)
