"""From ``--method`` to an optimiser: the one place that knows what each method is."""

from __future__ import annotations

from torch import Tensor

from cryosgd.optim.base import Chain
from cryosgd.optim.cg import ConjugateGradient
from cryosgd.optim.precondition import shell_threshold
from cryosgd.optim.sgd import algorithm1, exact_diagonal_sgd, plain_sgd, running_diagonal_sgd
from cryosgd.recon.settings import ReconstructionSettings


def sgd_optimizer(settings: ReconstructionSettings, box_px: int, diagonal: Tensor | None) -> Chain:
    """The minibatch method's chain of transforms; ``diagonal``: the exact diag(H) when
    ``settings.uses_exact_diagonal``."""
    if settings.method == "sgd":
        return plain_sgd()
    if settings.method == "exact-diag":
        return exact_diagonal_sgd(diagonal)
    if settings.method == "running-diag":
        return running_diagonal_sgd(settings.beta)
    alpha = shell_threshold(box_px) if settings.alpha is None else settings.alpha
    return algorithm1(beta=settings.beta, alpha=alpha, d0=1.0 if diagonal is None else diagonal, forget=settings.forget)


def cg_optimizer(settings: ReconstructionSettings, diagonal: Tensor | None) -> ConjugateGradient:
    """CG (``cg``) or Jacobi-preconditioned CG (``pcg``, M = the exact diag(H))."""
    return ConjugateGradient(diagonal if settings.method == "pcg" else None)
