"""``cryosgd reconstruct``: two independent half-set reconstructions and their files.

After the first pass and after every epoch both halves are checkpointed (``checkpoint.pt``)
and ``metrics.jsonl`` is rewritten; ``resume=True`` continues from the checkpoint, which must
have been made from the same particles (the STAR file's path, a digest of its table and the
stacks' sizes) and settings, and ends at the same maps as an uninterrupted run. With
``settings.epochs=None`` epochs run while the half-map FSC (its mean over shells) rises, and
the maps of the best epoch are kept. At the end: ``half1.mrc``, ``half2.mrc`` and ``map.mrc``
(all particles: :func:`~cryosgd.recon.known_pose.joint_map`) at the working box and pixel size,
``fsc.csv`` and, with ``noise="estimate"``, ``noise.csv``. Only rank 0 writes (:mod:`cryosgd.dist`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryosgd import dist
from cryosgd.data.particles import ParticleTable, read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.fourier.fsc import FSCCurve, fsc
from cryosgd.fourier.grids import FourierGrid
from cryosgd.io.atomic import write_lines
from cryosgd.io.checkpoint import load_resumable, save_checkpoint
from cryosgd.io.mrc import write_map
from cryosgd.objective.loss import DataTerms
from cryosgd.objective.noise import spectra
from cryosgd.optim.cg import CGState
from cryosgd.optim.linesearch import ArmijoState
from cryosgd.optim.precondition import HutchinsonState, RunningDiagonalState
from cryosgd.recon.gold_standard import half_map_fsc, map_of, split_halves, ssnr_between
from cryosgd.recon.halves import HalfSet
from cryosgd.recon.known_pose import (HalfState, data_terms, epoch_metrics, epoch_steps, initial_state, joint_map,
                                     one_pass_map, residual_powers, with_prior)
from cryosgd.recon.settings import ReconstructionSettings

OUTPUTS = ("half1.mrc", "half2.mrc", "map.mrc", "fsc.csv", "metrics.jsonl", "checkpoint.pt", "noise.csv")
_STATE_TYPES = [HalfState, DataTerms, HutchinsonState, ArmijoState, CGState, RunningDiagonalState]
_RISE = 1e-3  # the half-map FSC must rise by more than this (mean over shells) for another epoch


@dataclass(frozen=True)
class ReconstructionResult:
    out_dir: Path
    fsc: FSCCurve
    metrics: list[dict]
    epoch: int  # the epoch whose maps were written

    @property
    def resolution_A(self) -> float:
        return self.fsc.resolution_at(0.143)


class Silent:
    """A progress display that shows nothing (the default of the Python API)."""

    def total(self, steps: int) -> None: ...

    def advance(self) -> None: ...

    def line(self, text: str) -> None: ...


@dataclass(frozen=True)
class ReconstructionInput:
    """What a reconstruction reads and checks before it writes anything: the particles, the
    headers of their stacks, the working grid and the two half-sets (no image is read yet)."""

    star: Path
    table: ParticleTable
    stack: ImageStack
    grid: FourierGrid
    halves: tuple[np.ndarray, np.ndarray]

    @classmethod
    def read(cls, star: str | Path, settings: ReconstructionSettings, pixel_A: float | None = None
             ) -> ReconstructionInput:
        table = read_particles(star, pixel_A=pixel_A)
        table.require_poses()
        stack = ImageStack(table)
        grid = FourierGrid.create(stack.box_px, table.pixel_A, settings.work_box_px, source=stack.paths[0])
        return cls(Path(star), table, stack, grid, tuple(split_halves(table, settings.seed)))

    def files(self) -> list[Path]:
        """The input files (none may be overwritten by an output)."""
        return [self.star, *self.stack.paths]

    def identity(self, settings: ReconstructionSettings) -> dict:
        """What a checkpoint is resumed only with: the STAR file's path, a digest of its table,
        the stacks' paths and sizes, and the settings."""
        return {"star": str(self.star.resolve()), "particles": self.table.digest(), "stacks": self.stack.files(),
                "settings": settings.identity()}


def reconstruct(inputs: ReconstructionInput, out_dir: str | Path,
                settings: ReconstructionSettings = ReconstructionSettings(), *, resume: bool = False, device=None,
                dtype: torch.dtype = torch.float32, progress=Silent()) -> ReconstructionResult:
    """Gold-standard known-pose reconstruction of ``inputs`` into ``out_dir``."""
    halves = [HalfSet(inputs.table.subset(index), inputs.stack.subset(index), inputs.grid, settings, h, device, dtype)
              for h, index in enumerate(inputs.halves, start=1)]
    run = _Run(Path(out_dir), inputs.identity(settings))
    states, metrics, stopped = run.load(device) if resume else (None, [], False)
    finished = stopped and settings.epochs is None  # the automatic rule stopped it; a set count goes on
    limit = settings.max_epochs if settings.epochs is None else settings.epochs
    done = -1 if states is None else states[0].epoch
    progress.total(sum(h.steps_per_epoch for h in halves) * (limit - max(done, 0))
                   + (0 if states else len(halves) * (2 if settings.noise == "estimate" else 1)))
    if states is None:
        states, seconds = _first_pass(halves, progress)
        rows = _metrics_rows(halves, states, [_first_pass_metrics(h, seconds / len(halves)) for h in halves])
        metrics = run.save(states, rows, stopped=False)
        progress.line(_first_pass_line(metrics))
    while not finished and states[0].epoch < limit:
        states, metrics, finished = _next_epoch(halves, states, metrics, progress)
        metrics = run.save(states, metrics, stopped=finished)
    return _write_outputs(run.out_dir, halves, states, metrics)


def _first_pass(halves: list[HalfSet], progress) -> tuple[list[HalfState], float]:
    """Epoch 0 of both halves: their data terms and the Wiener prior from the one-pass maps;
    with ``noise="estimate"``, then the noise spectrum from the residuals to those maps (pooled
    over both halves) and the data terms again under its weight."""
    start = time.perf_counter()
    states = _initial_states(halves, None, progress)
    if halves[0].settings.noise == "estimate":
        powers = [residual_powers(h, one_pass_map(h, s)) for h, s in zip(halves, states)]
        sums, counts = (sum(parts) for parts in zip(*powers))
        sigma2 = spectra(sums, counts, [g.name for g in halves[0].table.optics])
        states = _initial_states(halves, sigma2, progress)
    return states, time.perf_counter() - start


def _initial_states(halves: list[HalfSet], sigma2, progress) -> list[HalfState]:
    states = []
    for h in halves:
        states.append(initial_state(h, data_terms(h, sigma2), sigma2))
        progress.advance()
    if halves[0].settings.prior == "wiener":
        ssnr = ssnr_between(*(one_pass_map(h, s) for h, s in zip(halves, states)))
        states = [with_prior(h, s, ssnr) for h, s in zip(halves, states)]
    return states


def _next_epoch(halves: list[HalfSet], states: list[HalfState], metrics: list[dict], progress):
    """One epoch of both halves, step by step in lockstep. With automatic epochs the half-map
    FSC is measured after every pair of steps, and the run stops (keeping the best maps so far)
    at the first step that lowers it, or after an epoch that raised it by less than ``_RISE``.
    Returns (states, metrics, finished)."""
    settings, epoch = halves[0].settings, states[0].epoch + 1
    current = states
    if settings.prior == "wiener" and epoch > 1:  # τ² from the maps so far, as a resumed run sees it
        ssnr = ssnr_between(states[0].x, states[1].x)
        current = [with_prior(h, s, ssnr) for h, s in zip(halves, states)]
    start, automatic = time.perf_counter(), settings.epochs is None
    before = best_fsc = _half_map_fsc(halves, states).mean()
    best, best_step, steps = states, 0, []
    for pair in zip(*(epoch_steps(h, s, epoch, progress.advance) for h, s in zip(halves, current))):
        steps.append(pair)
        if automatic:
            fsc_mean = _half_map_fsc(halves, [s for s, _ in pair]).mean()
            if fsc_mean <= best_fsc:
                break
            best, best_step, best_fsc = [s for s, _ in pair], len(steps), fsc_mean
    seconds = (time.perf_counter() - start) / len(halves)
    reached = [s for s, _ in steps[-1]]
    rows = _metrics_rows(halves, reached, [epoch_metrics(h, s, [pair[i] for pair in steps], seconds)
                                           for i, (h, s) in enumerate(zip(halves, current))])
    progress.line(_epoch_line(rows, before))
    if not automatic:
        return reached, metrics + rows, False
    if best_step < len(steps) or best_fsc <= before + _RISE:
        kept = f"epoch {epoch}, step {best_step}" if best_step else (
            "the first pass" if epoch == 1 else f"epoch {epoch - 1}")
        progress.line(f"stopping: the half-map FSC no longer rises; keeping the maps of {kept}")
        return best, metrics + rows, True
    return reached, metrics + rows, False


def _half_map_fsc(halves: list[HalfSet], states: list[HalfState]) -> FSCCurve:
    return half_map_fsc(states[0].x, states[1].x, halves[0].grid, halves[0].settings.interp)


def _first_pass_metrics(half: HalfSet, seconds: float) -> dict:
    return {"epoch": 0, "half": half.half, "loss": None, "step_size": None, "map_change": None, "seconds": seconds}


def _metrics_rows(halves: list[HalfSet], states: list[HalfState], epoch_metrics: list[dict]) -> list[dict]:
    """One row per half: the epoch's own numbers and the half-map FSC after it."""
    curve = _half_map_fsc(halves, states)
    return [{**m, "fsc_mean": curve.mean(), "resolution_A": curve.resolution_at(0.143)} for m in epoch_metrics]


def _first_pass_line(metrics: list[dict]) -> str:
    first = metrics[-1]
    seconds = sum(m["seconds"] for m in metrics[-2:])
    return (f"first pass (back-projection of every image): half-map resolution {first['resolution_A']:.2f} Å, "
            f"mean FSC {first['fsc_mean']:.3f}, {seconds:.1f} s")


def _epoch_line(rows: list[dict], before: float) -> str:
    one, two = rows
    return (f"epoch {one['epoch']}: half 1 loss {one['loss']:.6g}, half 2 loss {two['loss']:.6g}; "
            f"half-map resolution {one['resolution_A']:.2f} Å, mean FSC {one['fsc_mean']:.3f} "
            f"({one['fsc_mean'] - before:+.3f}); {one['seconds'] + two['seconds']:.1f} s")


@dataclass
class _Run:
    """``checkpoint.pt`` and ``metrics.jsonl`` of a run (rank 0 writes, every rank reads)."""

    out_dir: Path
    identity: dict

    @property
    def path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def load(self, device) -> tuple[list[HalfState], list[dict], bool]:
        saved = load_resumable(self.path, self.identity, _STATE_TYPES, device)
        return saved["halves"], saved["metrics"], saved["stopped"]

    def save(self, states: list[HalfState], metrics: list[dict], stopped: bool) -> list[dict]:
        """Save after an epoch; ``stopped``: the automatic rule ended the run (``states`` are the best)."""
        if dist.is_main():
            save_checkpoint(self.path, {"identity": self.identity, "halves": states, "metrics": metrics,
                                        "stopped": stopped})
            write_lines(self.out_dir / "metrics.jsonl", [json.dumps(m) for m in metrics])
        return metrics


def _write_outputs(out_dir: Path, halves: list[HalfSet], states: list[HalfState], metrics) -> ReconstructionResult:
    """half1.mrc, half2.mrc, map.mrc, fsc.csv and the noise spectrum (rank 0)."""
    grid, interp = halves[0].grid, halves[0].settings.interp
    maps = [map_of(x, grid, interp) for x in (states[0].x, states[1].x, joint_map(halves, states))]
    pixel = grid.work_pixel_A
    curve = fsc(maps[0], maps[1], pixel)
    if dist.is_main():
        for name, volume in zip(("half1.mrc", "half2.mrc", "map.mrc"), maps):
            write_map(out_dir / name, volume, pixel)
        write_lines(out_dir / "fsc.csv", ["shell,resolution_A,fsc"] + [
            f"{i},{r:.4f},{f:.6f}" for i, (r, f) in enumerate(zip(curve.resolution_A, curve.fsc))])
        if states[0].sigma2 is not None:
            _write_noise(out_dir / "noise.csv", grid, states[0].sigma2, [g.name for g in halves[0].table.optics])
    return ReconstructionResult(out_dir, curve, metrics, states[0].epoch)


def _write_noise(path: Path, grid: FourierGrid, sigma2: torch.Tensor, group_names: list[str]) -> None:
    """noise.csv: shell, resolution (Å), then σ² of each optics group."""
    shells = np.arange(sigma2.shape[1])
    resolution = grid.box_px * grid.pixel_A / np.maximum(shells, 1)
    write_lines(path, ["shell,resolution_A," + ",".join(f"sigma2_{name}" for name in group_names)]
                + [f"{s},{'inf' if s == 0 else f'{r:.4f}'}," + ",".join(f"{float(v):.6g}" for v in sigma2[:, s])
                   for s, r in zip(shells, resolution)])
