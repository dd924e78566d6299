"""(Preconditioned) SGD with the paper's preconditioned Armijo backtracking.

Each epoch starts from ``eta_max``; before every step η grows by ``growth``, then halves
until f_B(x − η ∇f_B/D̂) ≤ f_B(x) − c η Σ|∇f_B|²/D̂ on the same batch (PAPER.md §3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryosgd.optim.precondition import FixedDiagonal, Hutchinson, Identity


@dataclass(frozen=True)
class PreconditionedSGD:
    """SGD with a diagonal preconditioner and Armijo backtracking."""

    preconditioner: Identity | FixedDiagonal | Hutchinson
    eta_max: float = 1.0
    growth: float = 2.0
    armijo_c: float = 0.99
    max_backtracks: int = 60

    def init(self, x: Tensor) -> dict:
        return {"eta": self.eta_max, "precond": self.preconditioner.init(x)}

    def start_epoch(self, state: dict) -> dict:
        return {**state, "eta": self.eta_max}

    def update(self, x: Tensor, state: dict, objective, batch, generator: torch.Generator):
        """One step on ``batch``: returns ``(x, state, info)`` with info = loss, step size, backtracks."""
        z = self.preconditioner.probe(state["precond"], generator)
        loss, gradient, hz = objective.loss_gradient_hvp(x, batch, z)
        d_hat, precond_state = self.preconditioner.update(state["precond"], z, hz)
        direction = gradient if d_hat is None else gradient / d_hat
        decrease = float((gradient.conj() * direction).real.sum())
        eta = state["eta"] * self.growth
        for backtracks in range(self.max_backtracks + 1):
            candidate = x - eta * direction
            if float(objective.loss(candidate, batch)) <= float(loss) - self.armijo_c * eta * decrease:
                break
            eta /= 2
        info = {"loss": float(loss), "step_size": eta, "backtracks": backtracks}
        return candidate, {"eta": eta, "precond": precond_state}, info


def algorithm1(beta: float = 0.9, alpha: float = 5.213981813631434e-6, d0: float | Tensor = 1.0,
               eta_max: float = 10.0) -> PreconditionedSGD:
    """The paper's Algorithm 1 with its defaults (η_max = 10, growth 1.2, c = 0.99)."""
    return PreconditionedSGD(Hutchinson(beta, alpha, d0), eta_max=eta_max, growth=1.2)


def plain_sgd() -> PreconditionedSGD:
    """The paper's SGD baseline (η_max = 1, growth 2, c = 0.99)."""
    return PreconditionedSGD(Identity(), eta_max=1.0, growth=2.0)


def exact_diagonal_sgd(diagonal: Tensor) -> PreconditionedSGD:
    """SGD preconditioned by a precomputed diagonal (the paper's "SGD+p")."""
    return PreconditionedSGD(FixedDiagonal(diagonal), eta_max=1.0, growth=2.0)
