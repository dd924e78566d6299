"""The paper's SGD methods as chains of transforms (PAPER.md §3.1, §4)."""

from __future__ import annotations

from torch import Tensor

from cryosgd.optim.base import Chain, chain
from cryosgd.optim.linesearch import Armijo
from cryosgd.optim.precondition import ScaleByDiagonal, ScaleByHutchinson, ScaleByRunningDiagonal


def algorithm1(beta: float = 0.9, alpha: float = 5.213981813631434e-6, d0: float | Tensor = 1.0,
               eta_max: float = 10.0, forget: float | None = None) -> Chain:
    """Algorithm 1: Hutchinson's diagonal, then Armijo (η_max = 10, growth 1.2, c = 0.99)."""
    return chain(ScaleByHutchinson(beta, alpha, d0, forget), Armijo(eta_max=eta_max, growth=1.2))


def plain_sgd() -> Chain:
    """The paper's SGD baseline (η_max = 1, growth 2, c = 0.99)."""
    return chain(Armijo(eta_max=1.0, growth=2.0))


def exact_diagonal_sgd(diagonal: Tensor) -> Chain:
    """SGD preconditioned by a precomputed diagonal (the paper's "SGD+p")."""
    return chain(ScaleByDiagonal(diagonal), Armijo(eta_max=1.0, growth=2.0))


def running_diagonal_sgd(beta: float = 0.9) -> Chain:
    """SGD preconditioned by the running average of the batches' exact diag(H): the diagonal
    that follows moving poses (refinement, ab initio); Armijo as Algorithm 1."""
    return chain(ScaleByRunningDiagonal(beta), Armijo(eta_max=10.0, growth=1.2))
