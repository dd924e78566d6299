"""``cryosgd reconstruct``: two independent half-set reconstructions and their outputs.

Half-sets come from ``rlnRandomSubset`` when present, else from a seeded random split.
After every epoch both halves are checkpointed (``checkpoint.pt``) and ``metrics.jsonl`` is
rewritten; ``resume=True`` continues from the checkpoint and ends at the same maps as an
uninterrupted run. At the end: ``half1.mrc``, ``half2.mrc`` and ``map.mrc`` (all particles:
:func:`~cryosgd.recon.known_pose.joint_map`) at the working box and pixel size, ``fsc.csv``,
``fsc.png``, ``loss.png`` and, with ``noise="estimate"``, ``noise.csv`` (σ² per image shell).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryosgd.analysis.fsc import FSCCurve, fsc, fsc_of_ft
from cryosgd.checkpoint import load_checkpoint, save_checkpoint
from cryosgd.conventions import ft_to_map
from cryosgd.data.particles import ParticleTable, read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import apodization
from cryosgd.io.mrc import write_map
from cryosgd.objective.noise import noise_weight, spectra
from cryosgd.recon.known_pose import (HalfSet, ReconstructionSettings, init_half, joint_map, one_pass_map,
                                     residual_powers, run_epoch, set_prior)
from cryosgd.report import save_fsc_plot, save_loss_plot, write_lines


@dataclass(frozen=True)
class ReconstructionResult:
    out_dir: Path
    fsc: FSCCurve
    metrics: list[dict]

    @property
    def resolution_A(self) -> float:
        return self.fsc.resolution_at(0.143)


def split_halves(table: ParticleTable, seed: int) -> list[np.ndarray]:
    """Particle indices of half-sets 1 and 2 (rlnRandomSubset, or a seeded random split)."""
    if table.random_subset is not None:
        halves = [np.nonzero(table.random_subset == h)[0] for h in (1, 2)]
    else:
        order = np.random.default_rng(seed).permutation(len(table))
        halves = [np.sort(order[0::2]), np.sort(order[1::2])]
    for h, index in enumerate(halves, start=1):
        if len(index) == 0:
            raise InputError(table.source, f"rlnRandomSubset: half-set {h} is empty")
    return halves


def map_of(x: torch.Tensor, grid: FourierGrid, interp: str) -> np.ndarray:
    """Real-space map at the working box, in the density units of the full-box map.

    The gridding correction multiplies by the interpolation's apodisation: the fitted ``x``
    is the transform of ``v / sinc²``, whose slices match projections of ``v``.
    """
    n = grid.work_box_px
    profile = apodization(n, interp).to(x.device)
    volume = ft_to_map(x.to(torch.complex128), n) * (n / grid.box_px) ** 3
    volume = volume * profile[:, None, None] * profile[None, :, None] * profile[None, None, :]
    return volume.cpu().numpy().astype(np.float32)


class _Progress:
    """A rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import Progress
            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task("reconstructing", total=total)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def reconstruct(star: str | Path, out_dir: str | Path, settings: ReconstructionSettings = ReconstructionSettings(),
                *, resume: bool = False, device: str | None = None, pixel_A: float | None = None,
                dtype: torch.dtype = torch.float32) -> ReconstructionResult:
    """Gold-standard known-pose reconstruction of the particles of ``star`` into ``out_dir``."""
    out_dir = Path(out_dir)
    table = read_particles(star, pixel_A=pixel_A)
    table.require_poses()
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A, settings.work_box_px)
    halves = [HalfSet(table.subset(index), stack.subset(index), grid, settings, h, device, dtype)
              for h, index in enumerate(split_halves(table, settings.seed), start=1)]
    checkpoint = _Checkpoint(out_dir, settings, len(table))
    states, metrics = checkpoint.load(device) if resume and checkpoint.exists() else ([], [])
    done = states[0]["epoch"] if states else -1  # -1: not even the first pass
    first_passes = len(halves) * (2 if settings.noise == "estimate" else 1)
    progress = _Progress(sum(h.steps_per_epoch for h in halves) * (settings.epochs - max(done, 0))
                         + (first_passes if done < 0 else 0))
    try:
        if done < 0:
            states = _first_pass(halves, progress)
            metrics = checkpoint.save(states, metrics)
            progress.line(_epoch_line(metrics, settings.epochs))
        for epoch in range(states[0]["epoch"] + 1, settings.epochs + 1):
            if settings.prior == "wiener" and epoch > 1:  # τ² from the maps so far, as a resumed run sees it
                states = _with_prior(halves, states, [s["x"] for s in states])
            states = [run_epoch(h, s, epoch, progress.advance) for h, s in zip(halves, states)]
            metrics = checkpoint.save(states, metrics)
            progress.line(_epoch_line(metrics, settings.epochs))
    finally:
        progress.close()
    maps = [map_of(x, grid, settings.interp) for x in (states[0]["x"], states[1]["x"], joint_map(halves, states))]
    return _write_outputs(out_dir, grid, maps, metrics, states[0]["sigma2"], [g.name for g in table.optics])


def _first_pass(halves: list[HalfSet], progress: _Progress) -> list[dict]:
    """Epoch 0 of both halves: their data terms and the Wiener prior from the one-pass maps;
    with ``noise="estimate"``, then the noise spectrum from the residuals to those maps (pooled
    over both halves) and the data terms again under its weight."""
    start, sigma2 = time.perf_counter(), None
    states = _data_terms(halves, progress)
    if halves[0].settings.noise == "estimate":
        powers = [residual_powers(h, one_pass_map(h, s)) for h, s in zip(halves, states)]
        sums, counts = (sum(parts) for parts in zip(*powers))
        sigma2 = spectra(sums, counts, [g.name for g in halves[0].table.optics])
        for h in halves:
            h.objective.noise_weight = noise_weight(sigma2, h.grid)
        states = _data_terms(halves, progress)
    seconds = (time.perf_counter() - start) / len(halves)  # shared evenly: the halves' work is mixed
    for s in states:
        s["sigma2"], s["metrics"]["seconds"] = sigma2, seconds
    return states


def _data_terms(halves: list[HalfSet], progress: _Progress) -> list[dict]:
    states = []
    for h in halves:
        states.append(init_half(h))
        progress.advance()
    if halves[0].settings.prior == "wiener":
        states = _with_prior(halves, states, [one_pass_map(h, s) for h, s in zip(halves, states)])
    return states


def _with_prior(halves: list[HalfSet], states: list[dict], maps: list[torch.Tensor]) -> list[dict]:
    """Both halves' states under the Wiener prior estimated from the FSC of ``maps``."""
    curve = torch.as_tensor(fsc_of_ft(maps[0], maps[1], halves[0].grid.work_box_px))
    return [set_prior(h, s, curve / (1 - curve)) for h, s in zip(halves, states)]


@dataclass
class _Checkpoint:
    """``checkpoint.pt`` and ``metrics.jsonl`` of a run, rewritten atomically after every epoch."""

    out_dir: Path
    settings: ReconstructionSettings
    n_particles: int

    @property
    def path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def exists(self) -> bool:
        return self.path.exists()

    def load(self, device) -> tuple[list[dict], list[dict]]:
        saved = load_checkpoint(self.path, device)
        if saved["settings"] != {**dataclasses.asdict(self.settings), "epochs": saved["settings"]["epochs"]} \
                or saved["n_particles"] != self.n_particles:
            raise InputError(self.path, "--resume: the checkpoint was made with other settings or particles")
        return saved["halves"], saved["metrics"]

    def save(self, states: list[dict], metrics: list[dict]) -> list[dict]:
        """Move the states' metrics into ``metrics``, save both files; returns ``metrics``."""
        metrics = metrics + [s.pop("metrics") for s in states]
        save_checkpoint(self.path, {"settings": dataclasses.asdict(self.settings), "epoch": states[0]["epoch"],
                                    "n_particles": self.n_particles, "halves": states, "metrics": metrics})
        write_lines(self.out_dir / "metrics.jsonl", [json.dumps(m) for m in metrics])
        return metrics


def _epoch_line(metrics: list[dict], epochs: int) -> str:
    """One progress line for the last epoch in ``metrics`` (its two halves)."""
    first, second = metrics[-2:]
    seconds = first["seconds"] + second["seconds"]
    if first["epoch"] == 0:
        return f"epoch 0/{epochs}: one pass (b = S*y, diag H, H·1), {seconds:.1f} s"
    return (f"epoch {first['epoch']}/{epochs}: loss {first['loss']:.6g} / {second['loss']:.6g}, "
            f"step {first['step_size']:.3g}, {seconds:.1f} s")


def _write_outputs(out_dir: Path, grid: FourierGrid, maps: list[np.ndarray], metrics,
                   sigma2: torch.Tensor | None, group_names: list[str]) -> ReconstructionResult:
    """half1.mrc, half2.mrc, map.mrc (``maps`` in that order), FSC, plots and the noise spectrum."""
    pixel = grid.work_pixel_A
    for name, volume in zip(("half1.mrc", "half2.mrc", "map.mrc"), maps):
        write_map(out_dir / name, volume, pixel)
    curve = fsc(maps[0], maps[1], pixel)
    rows = ["shell,resolution_A,fsc"] + [f"{i},{r:.4f},{f:.6f}" for i, (r, f)
                                         in enumerate(zip(curve.resolution_A, curve.fsc))]
    write_lines(out_dir / "fsc.csv", rows)
    save_fsc_plot(out_dir / "fsc.png", np.arange(len(curve.fsc)), curve.fsc, curve.resolution_A,
                  f"half-map FSC: {curve.resolution_at(0.143):.2f} Å at 0.143")
    save_loss_plot(out_dir / "loss.png", metrics)
    if sigma2 is not None:
        _write_noise(out_dir / "noise.csv", grid, sigma2, group_names)
    return ReconstructionResult(out_dir, curve, metrics)


def _write_noise(path: Path, grid: FourierGrid, sigma2: torch.Tensor, group_names: list[str]) -> None:
    """noise.csv: shell, resolution (Å), then σ² of each optics group."""
    shells = np.arange(sigma2.shape[1])
    resolution = grid.box_px * grid.pixel_A / np.maximum(shells, 1)
    write_lines(path, ["shell,resolution_A," + ",".join(f"sigma2_{name}" for name in group_names)]
                + [f"{s},{'inf' if s == 0 else f'{r:.4f}'}," + ",".join(f"{float(v):.6g}" for v in sigma2[:, s])
                   for s, r in zip(shells, resolution)])
