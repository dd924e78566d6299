"""(Preconditioned) conjugate gradients on the normal equations H x = b, b = −∇f(0).

Every iteration needs one full-data H·p (one pass over all images), so one iteration is one
epoch. ``diagonal`` turns it into Jacobi-preconditioned CG with M = diag(H), the exact
diagonal of :mod:`cryosgd.objective.diagonal`. The caller supplies ``full_hvp``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from cryosgd.optim.base import inner


@dataclass(frozen=True)
class CGState:
    r: Tensor  # residual b − H x
    p: Tensor  # search direction
    rz: float  # ⟨r, M⁻¹ r⟩


@dataclass(frozen=True)
class ConjugateGradient:
    """Linear (P)CG for the real inner product on the half-grid map."""

    diagonal: Tensor | None = None

    def _precondition(self, r: Tensor) -> Tensor:
        return r if self.diagonal is None else r / self.diagonal

    def init(self, residual: Tensor) -> CGState:
        """Start (or restart) from the residual r = b − H x = −∇f(x) at the current x."""
        z = self._precondition(residual)
        return CGState(residual, z, inner(residual, z))

    def update(self, x: Tensor, state: CGState, full_hvp: Callable[[Tensor], Tensor]):
        """One iteration; once the residual is exactly zero (converged), x stays where it is."""
        hp = full_hvp(state.p)
        curvature = inner(state.p, hp)
        if state.rz == 0.0 or curvature == 0.0:
            return x, state, {"step_size": 0.0, "residual_norm": inner(state.r, state.r) ** 0.5}
        step = state.rz / curvature
        x = x + step * state.p
        r = state.r - step * hp
        z = self._precondition(r)
        rz = inner(r, z)
        p = z + (rz / state.rz) * state.p
        return x, CGState(r, p, rz), {"step_size": step, "residual_norm": inner(r, r) ** 0.5}
