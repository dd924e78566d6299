"""Conjugate gradients on the normal equations H x = b, b = −∇f(0): the deterministic baseline.

Every iteration needs one full-data H·p (one pass over all images), so one CG iteration is
one epoch. The caller supplies ``full_hvp``; the state is checkpointable like the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


def _dot(a: Tensor, b: Tensor) -> float:
    return float((a.conj() * b).real.sum())


@dataclass(frozen=True)
class ConjugateGradient:
    """Linear CG for the real inner product on the half-grid map."""

    def init(self, x: Tensor, full_gradient: Tensor) -> dict:
        r = -full_gradient
        return {"r": r, "p": r.clone(), "rs": _dot(r, r)}

    def update(self, x: Tensor, state: dict, full_hvp: Callable[[Tensor], Tensor]):
        hp = full_hvp(state["p"])
        step = state["rs"] / _dot(state["p"], hp)
        x = x + step * state["p"]
        r = state["r"] - step * hp
        rs = _dot(r, r)
        p = r + (rs / state["rs"]) * state["p"]
        return x, {"r": r, "p": p, "rs": rs}, {"step_size": step, "residual_norm": rs**0.5}
