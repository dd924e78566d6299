"""Per-shell convergence of known-pose optimisers towards a reference solution (PAPER.md §4.3).

After every epoch (index 0 is the start) the map is compared with the reference by FSC per
RELION shell (width 1 voxel; the paper uses width √3). "Epochs to FSC > t" for a set of
shells is the first epoch at which every one of them is above t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryosgd.fourier.fsc import fsc_of_ft
from cryosgd.recon.halves import HalfSet
from cryosgd.recon.known_pose import HalfState, data_terms, initial_state, run_epoch


@dataclass(frozen=True)
class Trace:
    """FSC against the reference ``(epochs + 1, shells)`` and the loss after each epoch."""

    fsc: np.ndarray
    loss: list[float]


def start(half: HalfSet) -> HalfState:
    """One half's state after the first pass, without a prior (a single half has no FSC)."""
    return initial_state(half, data_terms(half), None)


def converged(half: HalfSet, iterations: int) -> torch.Tensor:
    """The reference: ``iterations`` of Jacobi-preconditioned CG (``half`` must use method pcg)."""
    state = start(half)
    for epoch in range(1, iterations + 1):
        state, _ = run_epoch(half, state, epoch)
    return state.x


def trace(half: HalfSet, reference: torch.Tensor, epochs: int) -> Trace:
    """Run ``half.settings`` for ``epochs`` epochs, measuring FSC to ``reference`` after each."""
    box = half.grid.work_box_px
    state = start(half)
    curves, losses = [fsc_of_ft(state.x, reference, box)], []
    for epoch in range(1, epochs + 1):
        state, metrics = run_epoch(half, state, epoch)
        curves.append(fsc_of_ft(state.x, reference, box))
        losses.append(metrics["loss"])
    return Trace(np.nan_to_num(np.array(curves)), losses)


def epochs_to(fsc: np.ndarray, threshold: float, shells: slice) -> int | None:
    """First epoch at which FSC > threshold in every shell of ``shells``, or None."""
    reached = np.all(fsc[:, shells] > threshold, axis=1)
    return int(np.argmax(reached)) if reached.any() else None
