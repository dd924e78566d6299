"""Extreme eigenvalues of symmetric operators by the Lanczos method, several at once.

Vectors are complex tensors seen as real ones: the inner product is ``⟨a, b⟩ = Re Σ conj(a) b``,
for which the Hessian of a real loss of a complex map is symmetric. ``apply`` maps a stack
``(K, ...)`` of K vectors to the stack of their images under K operators (for example one
Hessian restricted to K balls), so every Lanczos step costs one call: one pass over the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Extremes:
    """Smallest and largest Ritz values ``(K,)`` after ``iterations`` Lanczos steps."""

    smallest: Tensor
    largest: Tensor
    iterations: int

    @property
    def condition_number(self) -> Tensor:
        return self.largest / self.smallest


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Real inner products of matching vectors in two stacks ``(K, ...)`` → ``(K, 1, ..., 1)``."""
    return (a.conj() * b).real.flatten(1).sum(1).view(-1, *[1] * (a.dim() - 1))


def lanczos(apply: Callable[[Tensor], Tensor], start: Tensor, iterations: int, tol: float = 1e-9) -> Extremes:
    """Up to ``iterations`` Lanczos steps from ``start (K, ...)``, with full reorthogonalisation.

    The Krylov space stays in the span of the operator's range and ``start``: start inside an
    invariant subspace (e.g. a ball of frequencies) to get that restriction's spectrum. A
    column whose Krylov space is exhausted (β < tol·|α|) stops; its Ritz values are then the
    exact eigenvalues of the restriction.
    """
    k = start.shape[0]
    q = start / _dot(start, start).sqrt()
    basis, alphas, betas = [q], [], []
    steps = torch.zeros(k, dtype=torch.long)
    active = torch.ones(k, dtype=torch.bool)
    for _ in range(iterations):
        w = apply(q)
        alpha = _dot(q, w)
        alphas.append(alpha.flatten().double().cpu())
        steps += active
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            for v in basis:
                w = w - _dot(v, w) * v
        beta = _dot(w, w).sqrt()
        active &= (beta.flatten() > tol * alpha.flatten().abs()).cpu()
        if not active.any():
            break
        keep = active.to(w.device).view(-1, *[1] * (w.dim() - 1))
        q = torch.where(keep, w / beta.clamp(min=1e-300), torch.zeros_like(w))
        betas.append(torch.where(active, beta.flatten().double().cpu(), 0.0))
        basis.append(q)
    smallest, largest = torch.empty(k, dtype=torch.float64), torch.empty(k, dtype=torch.float64)
    for j in range(k):
        m = int(steps[j])
        tridiagonal = torch.diag(torch.stack([a[j] for a in alphas[:m]]))
        if m > 1:
            off = torch.stack([b[j] for b in betas[:m - 1]])
            tridiagonal = tridiagonal + torch.diag(off, 1) + torch.diag(off, -1)
        ritz = torch.linalg.eigvalsh(tridiagonal)
        smallest[j], largest[j] = ritz[0], ritz[-1]
    return Extremes(smallest, largest, int(steps.max()))
