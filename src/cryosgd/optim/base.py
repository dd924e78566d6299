"""Optimisers as small state transforms that compose, after optax.

A transform has ``init(x) -> state``, ``probe(state, generator) -> z | None`` (a vector whose
H·z it wants computed on the batch, together with the gradient, in one scatter) and
``update(direction, state, step) -> (direction, state, info)``. :func:`chain` runs transforms
in order, each turning the direction of the one before: Algorithm 1 is
``chain(scale_by_hutchinson(...), armijo(...))`` — the gradient is divided by Hutchinson's
diagonal, then scaled by the preconditioned Armijo step. The last transform's direction is the
update added to the map. States are frozen dataclasses of tensors and numbers, so they go into
checkpoints as they are (:mod:`cryosgd.io.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class Step:
    """What one minibatch step has computed, for the transforms to use.

    Attributes:
        gradient: ∇f_B(x), the batch's mean gradient (ridge included).
        probe: the probe z of :meth:`Transform.probe`, or None.
        hz: H_B·z for that probe, or None.
        curvature: p ↦ ⟨p, H_B p⟩ (one forward pass, no scatter; exact: f_B is quadratic).
        new_epoch: True at the first step of an epoch.
        diagonal: the batch's exact diag(H), or H·1 (ridge included), when a transform asks for it
            (``wants_diagonal``), else None.
    """

    gradient: Tensor
    probe: Tensor | None
    hz: Tensor | None
    curvature: Callable[[Tensor], float]
    new_epoch: bool
    diagonal: Tensor | None = None


class Transform(Protocol):
    def init(self, x: Tensor): ...

    def probe(self, state, generator: torch.Generator) -> Tensor | None: ...

    def update(self, direction: Tensor, state, step: Step) -> tuple[Tensor, object, dict]: ...


@dataclass(frozen=True)
class Chain:
    """Transforms applied in order; the state is the tuple of their states."""

    transforms: tuple

    @property
    def wants_diagonal(self) -> int | None:
        """The weight power of the curvature a transform reads from ``Step.diagonal``: 2 for the
        exact diag(H), 1 for H·1 (computed in the gradient's scatter), or None."""
        return next((t.wants_diagonal for t in self.transforms if getattr(t, "wants_diagonal", None)), None)

    def init(self, x: Tensor) -> tuple:
        return tuple(t.init(x) for t in self.transforms)

    def probe(self, state: tuple, generator: torch.Generator) -> Tensor | None:
        probes = [z for t, s in zip(self.transforms, state) if (z := t.probe(s, generator)) is not None]
        if len(probes) > 1:
            raise ValueError("at most one transform of a chain may ask for a probe")
        return probes[0] if probes else None

    def update(self, direction: Tensor, state: tuple, step: Step) -> tuple[Tensor, tuple, dict]:
        states, info = [], {}
        for transform, s in zip(self.transforms, state):
            direction, s, more = transform.update(direction, s, step)
            states.append(s)
            info.update(more)
        return direction, tuple(states), info


def chain(*transforms) -> Chain:
    return Chain(tuple(transforms))


def inner(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ = Re Σ conj(a) b, the real inner product of maps, in float64."""
    return float((a.conj() * b).real.double().sum())
