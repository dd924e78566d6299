"""Diagonal preconditioners: identity, a fixed diagonal, and Hutchinson's running estimate.

Each is ``init(x) -> state``, ``probe(state, generator) -> z`` (a probe vector, or None when
the preconditioner needs no curvature information) and ``update(state, z, Hz) -> (D̂, state)``;
the optimiser computes ``H·z`` on the batch together with the gradient. ``D̂`` is a real
tensor of the map's shape (the step is ``−η ∇f / D̂``) or None for the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryosgd.objective.diagonal import probe_estimate, rademacher


@dataclass(frozen=True)
class Identity:
    """No preconditioning: plain SGD."""

    def init(self, x: Tensor) -> dict:
        return {}

    def probe(self, state: dict, generator: torch.Generator) -> None:
        return None

    def update(self, state: dict, z: None, hz: None) -> tuple[Tensor | None, dict]:
        return None, state


@dataclass(frozen=True)
class FixedDiagonal:
    """A precomputed diagonal (e.g. the exact diag(H)), floored at ``floor``."""

    diagonal: Tensor
    floor: float = 1e-10

    def init(self, x: Tensor) -> dict:
        return {}

    def probe(self, state: dict, generator: torch.Generator) -> None:
        return None

    def update(self, state: dict, z: None, hz: None) -> tuple[Tensor, dict]:
        return self.diagonal.abs().clamp(min=self.floor), state


@dataclass(frozen=True)
class Hutchinson:
    """Algorithm 1's diagonal (PAPER.md §3.1): one probe per batch, running mean D̄ over all
    probes so far, exponential average D ← βD + (1−β)D̄ from D₀, threshold D̂ = max(|D|, α).

    ``d0`` is a number (the paper: 1) or a tensor, e.g. an exact or analytic diagonal.
    """

    beta: float = 0.9
    alpha: float = 5.213981813631434e-6
    d0: float | Tensor = 1.0

    def init(self, x: Tensor) -> dict:
        real = x.real.dtype
        d = torch.as_tensor(self.d0, dtype=real, device=x.device).expand(x.shape).clone()
        return {"count": 0, "mean": torch.zeros(x.shape, dtype=real, device=x.device), "d": d}

    def probe(self, state: dict, generator: torch.Generator) -> Tensor:
        d = state["d"]
        return rademacher(d.shape, generator, torch.promote_types(d.dtype, torch.complex64), d.device)

    def update(self, state: dict, z: Tensor, hz: Tensor) -> tuple[Tensor, dict]:
        k = state["count"] + 1
        mean = state["mean"] + (probe_estimate(z, hz) - state["mean"]) / k
        d = self.beta * state["d"] + (1 - self.beta) * mean
        return d.abs().clamp(min=self.alpha), {"count": k, "mean": mean, "d": d}


def shell_threshold(box_px: int) -> float:
    """α = 1 / (largest number of voxels in a Fourier shell of width √3) (PAPER.md §3.1)."""
    axis = torch.fft.fftfreq(box_px, 1 / box_px, dtype=torch.float64)
    radius = torch.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    shell = torch.round(radius / 3**0.5).long()
    inside = radius <= box_px / 2 - 1
    return 1.0 / float(torch.bincount(shell[inside]).max())
