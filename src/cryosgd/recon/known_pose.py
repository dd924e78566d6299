"""Known-pose reconstruction of one half-set by (preconditioned) SGD or CG.

The map is the rfft half-grid of the working box. One pass over the data (epoch 0) scatters
b = S*y and the data terms of diag(H) and of H·1 together; the one-pass map b / (H·1 + ridge),
RELION's reconstruction up to its gridding iterations, is where the SGD methods start
(``start="backprojection"``; ``"zero"`` is the paper's start). CG starts from zero: its first
iterate is already the best multiple of that map. An epoch visits every particle of the
half-set once in a random order drawn from (seed, half, epoch), so a run resumed from an
epoch checkpoint repeats exactly what an uninterrupted run does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryosgd.data.batch import Batch, batch_indices, make_batch
from cryosgd.data.particles import ParticleTable
from cryosgd.data.stack import ImageStack
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid, shell_index
from cryosgd.model.forward import ForwardModel
from cryosgd.objective.diagonal import shell_means
from cryosgd.objective.loss import LeastSquares, voxel_multiplicity
from cryosgd.objective.noise import residual_power
from cryosgd.optim.cg import ConjugateGradient
from cryosgd.optim.precondition import shell_threshold
from cryosgd.optim.sgd import algorithm1, exact_diagonal_sgd, plain_sgd

METHODS = ("algorithm1", "sgd", "exact-diag", "cg", "pcg")
_FULL_BATCH = ("cg", "pcg")


@dataclass(frozen=True)
class ReconstructionSettings:
    """What ``cryosgd reconstruct`` is asked to do (checkpoints record it)."""

    method: str = "algorithm1"
    epochs: int = 3
    batch_size: int = 1000  # the paper's; smaller batches add SGD noise to the start map
    interp: str = "trilinear"
    work_box_px: int | None = None
    l2: float = 1e-8
    prior: str = "wiener"  # "wiener": per-shell ridge from the half-map FSC after each epoch; "none"
    shell_ridge: float = 1e-3  # plus this fraction of each shell's mean density H·1 (RELION's floor)
    beta: float = 0.9  # Algorithm 1's exponential-average weight
    alpha: float | None = None  # Algorithm 1's threshold; None: the paper's 1/(most voxels in a √3 shell)
    d0: str = "exact"  # Algorithm 1's initial diagonal: "one" (the paper) or "exact" (from epoch 0's pass)
    use_ctf: bool = True  # False: ignore the CTF columns
    start: str = "backprojection"  # the SGD methods' first map: "backprojection" (one-pass map) or "zero"
    noise: str = "white"  # "white": σ = 1 (the paper, relion_reconstruct); "estimate": σ²(shell) from residuals
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(None, f"--method {self.method}: expected one of {', '.join(METHODS)}")
        if self.prior not in ("wiener", "none"):
            raise InputError(None, f"--prior {self.prior}: expected wiener or none")
        if self.d0 not in ("one", "exact"):
            raise InputError(None, f"--d0 {self.d0}: expected one or exact")
        if self.noise not in ("white", "estimate"):
            raise InputError(None, f"--noise {self.noise}: expected white or estimate")
        if self.start not in ("backprojection", "zero"):
            raise InputError(None, f"--start {self.start}: expected backprojection or zero")
        if self.epochs < 0 or self.batch_size < 1:
            raise InputError(None, "--epochs must be ≥ 0 and --batch-size positive")
        if self.epochs == 0 and (self.method in _FULL_BATCH or self.start == "zero"):
            raise InputError(None, "--epochs 0 writes the one-pass map: it needs an SGD method and "
                                   "--start backprojection")


class HalfSet:
    """The particles of one half-set, their images (none if ``stack`` is None: poses and CTFs
    suffice for H) and the objective on the working grid."""

    def __init__(self, table: ParticleTable, stack: ImageStack | None, grid: FourierGrid,
                 settings: ReconstructionSettings, half: int, device=None, dtype=torch.float32):
        self.table, self.stack, self.grid, self.half = table, stack, grid, half
        self.settings, self.device, self.dtype = settings, device, dtype
        model = ForwardModel(grid, settings.interp, use_ctf=table.has_ctf and settings.use_ctf)
        self.objective = LeastSquares(model, l2=settings.l2)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in an epoch: one for the full-batch methods, else one per batch."""
        if self.settings.method in _FULL_BATCH:
            return 1
        return -(-len(self) // self.settings.batch_size)

    def batches(self, epoch: int | None) -> Iterator[Batch]:
        """Batches in the order of ``epoch`` (shuffled), or in file order when ``epoch`` is None."""
        rng = None if epoch is None else np.random.default_rng([self.settings.seed, self.half, epoch])
        for index in batch_indices(len(self.table), self.settings.batch_size, rng):
            yield make_batch(self.table, index, self.grid, self.stack, self.dtype, self.device)

    def full_mean(self, fn: Callable[[Batch], Tensor | tuple[Tensor, ...]]):
        """Mean over all particles of a per-batch mean ``fn(batch)`` (a tensor or a tuple of them)."""
        total = None
        for batch in self.batches(None):
            values = fn(batch)
            values = (values,) if isinstance(values, Tensor) else values
            weighted = [v * len(batch) for v in values]
            total = weighted if total is None else [t + w for t, w in zip(total, weighted)]
        means = [t / len(self) for t in total]
        return means[0] if len(means) == 1 else tuple(means)

    def zeros(self) -> Tensor:
        complex_dtype = torch.promote_types(self.dtype, torch.complex64)
        return torch.zeros(self.grid.volume_shape, dtype=complex_dtype, device=self.device)


def make_optimizer(half: HalfSet, diagonal: Tensor | None):
    """The SGD-type optimiser of ``half.settings.method``; ``diagonal`` from :func:`init_half`."""
    s = half.settings
    if s.method == "sgd":
        return plain_sgd()
    if s.method == "exact-diag":
        return exact_diagonal_sgd(diagonal)
    alpha = shell_threshold(half.grid.work_box_px) if s.alpha is None else s.alpha
    return algorithm1(beta=s.beta, alpha=alpha, d0=1.0 if diagonal is None else diagonal)


def init_half(half: HalfSet) -> dict:
    """Epoch-0 state of one half from one pass over the data: b = S*y, f(0), and the data parts
    of diag(H) and of the density H·1, under the objective's noise weight; then the floor
    ridge, the start map and the optimiser's state. It holds tensors and numbers only: it is
    what checkpoints store.
    """
    start = time.perf_counter()
    half.objective.l2 = 0.0
    c, b, data_diagonal, density = half.full_mean(half.objective.data_terms)
    x = half.zeros()
    state = {"x": x, "epoch": 0, "opt": None, "c": float(c), "b": b, "data_diagonal": data_diagonal,
             "density": density, "noise_weight": half.objective.noise_weight,
             "shell_weight": shell_means(density), "ridge": torch.zeros((), dtype=half.dtype, device=x.device)}
    state = set_prior(half, state, ssnr=None)
    state["metrics"] = {"epoch": 0, "half": half.half, "loss": None, "step_size": None,
                        "seconds": time.perf_counter() - start}
    return state


def one_pass_map(half: HalfSet, state: dict) -> Tensor:
    """b / (H·1 + ridge): the data's back-projection over their density, as RELION divides by
    its weights before the gridding iterations. It is the least-squares map where the map is
    smooth on the voxel scale (and exactly for nearest, where H = diag(H) = H·1); dividing by
    diag(H) instead would inflate trilinear maps about 3.5× (E Σ w² = (2/3)³ of (Σ w)² = 1)."""
    x = state["x"]
    return state["b"] / (state["density"] + half.objective.ridge(x.shape, x.device, half.dtype))


def joint_map(halves: list[HalfSet], states: list[dict]) -> Tensor:
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
        x, count = s["x"], len(h)
        multiplicity = voxel_multiplicity(x.shape, x.device, h.dtype)
        numerator = numerator + count * (s["density"] + s["ridge"] * multiplicity) * x
        denominator = denominator + count * (s["density"] + (s["ridge"] - 0.5 * s["wiener"]) * multiplicity)
    return numerator / denominator


def residual_powers(half: HalfSet, x: Tensor) -> tuple[Tensor, Tensor]:
    """Residual power against ``x`` per optics group and image shell, summed over the half's
    images, and the image counts per group (:func:`~cryosgd.objective.noise.residual_power`)."""
    sums, counts = half.full_mean(lambda batch: residual_power(half.objective, x, batch, len(half.table.optics)))
    return sums * len(half), counts * len(half)


def set_prior(half: HalfSet, state: dict, ssnr: Tensor | None) -> dict:
    """Set the per-voxel ridge λ + w̄(shell) · (shell_ridge + 1/SSNR(shell)) and what depends on it.

    ``w̄`` is the shell mean of the data density H·1 (RELION's summed weights) and SSNR =
    FSC/(1 − FSC) of the half maps (RELION's τ² = SSNR / w̄), floored at 1e-3; ``ssnr=None``
    leaves the floor ridge only. The state keeps the Wiener part w̄/SSNR apart (``"wiener"``).
    Before the first epoch, the SGD methods' start map is recomputed under the new ridge.
    A full-batch method restarts CG on the new system; its residual r = b − Hx changes by
    exactly −(R_new − R_old)·x, so no pass over the data is needed.
    """
    s, x = half.settings, state["x"]
    shells = shell_index(x.shape[0], x.device)
    inverse_ssnr = 0.0 if ssnr is None else 1.0 / _per_shell(ssnr, len(state["shell_weight"]))
    wiener = (state["shell_weight"] * inverse_ssnr)[shells].to(half.dtype)
    ridge = (s.l2 + (state["shell_weight"] * s.shell_ridge)[shells]).to(half.dtype) + wiener
    half.objective.l2 = ridge
    uses_diagonal = s.method in ("exact-diag", "pcg") or (s.method == "algorithm1" and s.d0 == "exact")
    diagonal = state["data_diagonal"] + half.objective.ridge(x.shape, x.device, half.dtype) if uses_diagonal else None
    if s.method in _FULL_BATCH:
        residual = state["b"] if state["opt"] is None else state["opt"]["r"]
        multiplicity = voxel_multiplicity(x.shape, x.device, half.dtype)
        opt = ConjugateGradient(diagonal).init(residual - (ridge - state["ridge"]) * multiplicity * x)
    else:
        opt = state["opt"]
        if state["epoch"] == 0:
            x = one_pass_map(half, state) if s.start == "backprojection" else x
            opt = make_optimizer(half, diagonal).init(x)
    return {**state, "x": x, "opt": opt, "diagonal": diagonal, "ridge": ridge, "wiener": wiener}


def _per_shell(ssnr: Tensor, n_shells: int) -> Tensor:
    """SSNR padded with zeros to ``n_shells`` (corner shells beyond Nyquist), floored at 1e-3."""
    out = torch.zeros(n_shells, dtype=torch.float64, device=ssnr.device)
    known = min(len(ssnr), n_shells)
    out[:known] = torch.nan_to_num(ssnr[:known].double(), nan=0.0)
    return out.clamp(min=1e-3)


def run_epoch(half: HalfSet, state: dict, epoch: int, on_batch: Callable[[], None] = lambda: None) -> dict:
    """One epoch (one iteration for ``cg``/``pcg``); returns the new state with its metrics."""
    start = time.perf_counter()
    x, opt = state["x"], state["opt"]
    half.objective.l2, half.objective.noise_weight = state["ridge"], state["noise_weight"]
    if half.settings.method in _FULL_BATCH:
        cg = ConjugateGradient(state["diagonal"])
        x, opt, info = cg.update(x, opt, lambda p: half.full_mean(lambda b: half.objective.hvp(p, b)))
        on_batch()
        steps = [info["step_size"]]
        loss = state["c"] - 0.5 * float((x.conj() * (state["b"] + opt["r"])).real.sum())  # f = c − ½⟨x, b + r⟩
    else:
        optimizer = make_optimizer(half, state["diagonal"])
        opt = optimizer.start_epoch(opt)
        generator = torch.Generator(device=x.device).manual_seed(
            int(np.random.default_rng([half.settings.seed, half.half, epoch, 1]).integers(2**62)))
        steps = []
        for batch in half.batches(epoch):
            x, opt, info = optimizer.update(x, opt, half.objective, batch, generator)
            steps.append(info["step_size"])
            on_batch()
        loss = float(half.full_mean(lambda b: half.objective.loss(x, b)))
    metrics = {"epoch": epoch, "half": half.half, "loss": loss, "step_size": float(np.median(steps)),
               "seconds": time.perf_counter() - start}
    return {**state, "x": x, "epoch": epoch, "opt": opt, "metrics": metrics}
