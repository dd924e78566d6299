"""The paper's preconditioned Armijo backtracking, as the last transform of a chain.

Before every step η grows by ``growth`` (from ``eta_max`` at an epoch's first step), then
halves until f_B(x − η p) ≤ f_B(x) − c η ⟨∇f_B, p⟩ (PAPER.md §3.1), p the preconditioned
direction. f_B is quadratic for fixed poses, so f_B(x − ηp) − f_B(x) = −η⟨∇f_B, p⟩ + ½η²⟨p, Hp⟩
exactly, and the test is ½ η ⟨p, Hp⟩ ≤ (1 − c) ⟨∇f_B, p⟩: one forward pass gives ⟨p, Hp⟩ for
every η tried. Unlike comparing two losses (numbers ~10⁴× larger than their difference), the
decision is not swayed by float rounding, so runs that differ only in the order of their sums
(threads, processes) take the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from cryosgd.optim.base import Step, inner


@dataclass(frozen=True)
class ArmijoState:
    eta: float


@dataclass(frozen=True)
class Armijo:
    eta_max: float = 1.0
    growth: float = 2.0
    c: float = 0.99
    max_backtracks: int = 60

    def init(self, x: Tensor) -> ArmijoState:
        return ArmijoState(self.eta_max)

    def probe(self, state, generator) -> None:
        return None

    def update(self, direction: Tensor, state: ArmijoState, step: Step):
        decrease = inner(step.gradient, direction)
        curvature = step.curvature(direction)
        eta = (self.eta_max if step.new_epoch else state.eta) * self.growth
        backtracks = 0
        while backtracks < self.max_backtracks and 0.5 * eta * curvature > (1 - self.c) * decrease:
            eta /= 2
            backtracks += 1
        return -eta * direction, ArmijoState(eta), {"step_size": eta, "backtracks": backtracks}
