"""Diagonal preconditioners as transforms: the direction is divided by a diagonal D̂.

D̂ is a real tensor of the map's shape: a fixed one (e.g. the exact diag(H)), or Algorithm 1's
running Hutchinson estimate (PAPER.md §3.1), whose mean can forget old probes exponentially
when the Hessian moves (poses that change between passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryosgd.objective.diagonal import probe_estimate, rademacher
from cryosgd.optim.base import Step


@dataclass(frozen=True)
class ScaleByDiagonal:
    """Divide by a fixed diagonal floored at ``floor``."""

    diagonal: Tensor
    floor: float = 1e-10

    def init(self, x: Tensor) -> tuple:
        return ()

    def probe(self, state, generator) -> None:
        return None

    def update(self, direction: Tensor, state, step: Step):
        return direction / self.diagonal.abs().clamp(min=self.floor), state, {}


@dataclass(frozen=True)
class HutchinsonState:
    count: int
    mean: Tensor
    d: Tensor


@dataclass(frozen=True)
class ScaleByHutchinson:
    """Algorithm 1's diagonal: one probe per step, mean D̄ of the probes (running mean over all
    so far, or ``D̄ ← ρ D̄ + (1−ρ) estimate`` with ``forget=ρ``), exponential average
    D ← βD + (1−β)D̄ from D₀, threshold D̂ = max(|D|, α); the direction is divided by D̂.

    ``d0`` is a number (the paper: 1) or a tensor, e.g. the exact diagonal of the first pass.
    """

    beta: float = 0.9
    alpha: float = 5.213981813631434e-6
    d0: float | Tensor = 1.0
    forget: float | None = None

    def init(self, x: Tensor) -> HutchinsonState:
        real = x.real.dtype
        d = torch.as_tensor(self.d0, dtype=real, device=x.device).expand(x.shape).clone()
        return HutchinsonState(0, torch.zeros(x.shape, dtype=real, device=x.device), d)

    def probe(self, state: HutchinsonState, generator: torch.Generator) -> Tensor:
        d = state.d
        return rademacher(d.shape, generator, torch.promote_types(d.dtype, torch.complex64), d.device)

    def update(self, direction: Tensor, state: HutchinsonState, step: Step):
        k = state.count + 1
        estimate = probe_estimate(step.probe, step.hz)
        rate = 1.0 / k if self.forget is None else max(1.0 / k, 1.0 - self.forget)
        mean = state.mean + rate * (estimate - state.mean)
        d = self.beta * state.d + (1 - self.beta) * mean
        return direction / d.abs().clamp(min=self.alpha), HutchinsonState(k, mean, d), {}


@dataclass(frozen=True)
class RunningDiagonalState:
    count: int
    d: Tensor


@dataclass(frozen=True)
class ScaleByRunningDiagonal:
    """Divide by an exponential average D ← βD + (1−β)D_B of the batches' exact diag(H), from
    the first batch that reaches each voxel, floored at ``floor``: the Gauss–Newton diagonal that
    follows poses that move (it costs one more channel of the gradient's scatter, no probe).
    With ``power=1`` D_B is H·1 instead, the data density RELION's VDAM divides by: for a map
    smooth on the voxel scale, H x ≈ (H·1) x, so g/(H·1) is about the Newton step."""

    beta: float = 0.9
    floor: float = 1e-10
    power: int = 2

    @property
    def wants_diagonal(self) -> int:
        return self.power

    def init(self, x: Tensor) -> RunningDiagonalState:
        return RunningDiagonalState(0, torch.zeros(x.shape, dtype=x.real.dtype, device=x.device))

    def probe(self, state, generator) -> None:
        return None

    def update(self, direction: Tensor, state: RunningDiagonalState, step: Step):
        seen = state.d > 1e-6 * state.d.max()  # voxels that batches have reached (a band that grows adds more)
        d = torch.where(seen, self.beta * state.d + (1 - self.beta) * step.diagonal, step.diagonal)
        return direction / d.abs().clamp(min=self.floor), RunningDiagonalState(state.count + 1, d), {}


@dataclass(frozen=True)
class Scale:
    """The update −η · direction (a fixed learning rate, as cryoSPARC's and VDAM's ab initio)."""

    eta: float

    def init(self, x: Tensor) -> tuple:
        return ()

    def probe(self, state, generator) -> None:
        return None

    def update(self, direction: Tensor, state, step: Step):
        return -self.eta * direction, state, {"step_size": self.eta}


def shell_threshold(box_px: int) -> float:
    """α = 1 / (largest number of voxels in a Fourier shell of width √3) (PAPER.md §3.1)."""
    axis = torch.fft.fftfreq(box_px, 1 / box_px, dtype=torch.float64)
    radius = torch.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    shell = torch.round(radius / 3**0.5).long()
    inside = radius <= box_px / 2 - 1
    return 1.0 / float(torch.bincount(shell[inside]).max())
