"""``cryosgd refine``: poses searched against each half's map, alternating with map updates.

Iteration n, for each half-set independently (docs/refinement.md):

1. **Search** every particle against the half's masked map on a band of frequencies: at the
   first iteration a global search (RELION's HEALPix grid in the asymmetric unit × a shift grid,
   with scale-profiled scores since the reference's greyscale is unknown) keeping ``top_k``
   poses; at the second and third, a global search again against the last map (origins within
   a pixel of the last, the band capped at 24 Fourier pixels), which catches the particles the
   low-resolution reference and then the first map misassigned; then, at every iteration,
   local refinement of the kept poses (:func:`cryosgd.pose.search.local_search`; the best
   alone after an iteration on the posterior grid): after a global search, two levels from a
   quarter of the grid's step or the particles' angular accuracy σ if larger; in the other
   iterations one level of step 2σ, which then ends on each particle's posterior grid: its
   ``soft_poses`` most likely of the 19 rotations around the best pose at step 1.5σ
   (:func:`cryosgd.pose.search.posterior_grid`). Posterior weights over a particle's poses (a
   softmax of the log-likelihoods tempered by τ = 3, 2, then 1; 2 on the grid) make (image,
   pose) rows, one per symmetry mate: the best pose alone would put each image where its
   noise best matches the reference, and the map would inherit that.
2. **Update** each half's map from its rows: ``em`` (the default) is one pass — b, diag(H) and
   H·1 of the weighted rows, the Wiener prior from the FSC of the two one-pass maps, the
   one-pass map (RELION's scheme); ``sgd`` runs one epoch of preconditioned SGD from the last
   map, each minibatch's poses searched against the current map first, the step divided by a
   running average of the minibatches' exact diagonals (it follows the poses) and sized by the
   paper's Armijo rule.
3. **Join** the half maps below ``join_res_A``. Their FSC sets the resolution and the next
   band (the FSC-0.143 shell plus ``band_margin_px``); σ² per optics group and image shell is
   re-estimated from the residuals of the search.

It stops when an iteration (from the third) raises the mean half-map FSC by less than 0.002
and moves fewer than 1 % of the best poses by more than its final step, when three iterations
in a row raise the FSC by less than 0.002, or at ``max_iter``: one last iteration then searches
at Nyquist, ends on the posterior grid and updates by ``em`` — unless the stalled iteration
already did all three, which is then the last. A checkpoint follows every iteration;
``resume`` repeats exactly what an uninterrupted run does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryosgd import dist
from cryosgd.conventions import euler_to_matrix, map_to_ft, matrix_to_euler
from cryosgd.data.batch import Batch, WeightedRows
from cryosgd.data.particles import ParticleTable, read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.errors import InputError
from cryosgd.fourier.fsc import FSCCurve, fsc
from cryosgd.fourier.grids import FourierGrid, shell_index
from cryosgd.fourier.maps import low_pass, masked_ft, resample, soft_sphere, support_radius_px
from cryosgd.io.atomic import write_lines
from cryosgd.io.checkpoint import load_resumable, save_checkpoint
from cryosgd.io.mrc import check_voxel_size, read_map, write_map
from cryosgd.objective.loss import DataTerms, LeastSquares
from cryosgd.objective.noise import residual_power
from cryosgd.optim.linesearch import ArmijoState
from cryosgd.optim.precondition import HutchinsonState, RunningDiagonalState
from cryosgd.pose.scores import band_mask, posterior_weights
from cryosgd.pose.search import (BandImages, Candidates, PoseTable, global_search, local_search, posterior_grid,
                                 weighted_rows)
from cryosgd.pose.shifts import local_shift_grid, shift_grid
from cryosgd.pose.so3 import angular_step_deg, geodesic_distance_deg
from cryosgd.pose.symmetry import symmetry_grid, symmetry_group
from cryosgd.recon.gold_standard import half_map_fsc, map_of, split_halves, ssnr_between
from cryosgd.recon.halves import HalfSet
from cryosgd.recon.known_pose import (HalfState, data_terms, initial_state, joint_map, one_pass_map, run_epoch,
                                     with_prior)
from cryosgd.recon.reconstruct import Silent
from cryosgd.recon.settings import ReconstructionSettings, RefineSettings, mask_radius_px

OUTPUTS = ("half1.mrc", "half2.mrc", "map.mrc", "fsc.csv", "fsc_iterations.csv", "metrics.jsonl", "particles.star",
           "checkpoint.pt")
_TEMPERATURES = (3.0, 2.0)  # iterations 1 and 2; 1 from then on
_LEVELS = 2  # local-search levels after a global search; one in the iterations without
_GLOBAL_ITERATIONS = 3  # global searches: from the reference, then from the first and second maps
_GLOBAL_BAND_PX = 24.0  # the later global searches' band, at most (their cost grows with the band's area)
_STALLED = 0.002  # an iteration that raises the mean half-map FSC by less …
_MOVED = 0.01  # … and moves fewer of the best poses by more than its final step has stalled;
_FSC_PATIENCE = 3  # so has a run whose FSC rose by less in this many iterations in a row, however many poses move
_NOISE_IMAGES = 4000  # images per optics group and half that σ² is re-estimated from
_SPREAD = 1.5  # the posterior grid's rotation steps: 1.5 σ (docs/refinement.md) …
_GRID_TEMPERATURE = 2.0  # … and the τ of its weights (box 128, 8 poses: FSC to the truth 0.697 at τ = 1, 0.718 at 2)
_SCHEDULE = 3  # the iterations' plan; a checkpoint of another resumes nothing (3: the stop rule counts moved poses)


@dataclass(frozen=True)
class RefineState:
    """The state after an iteration (what a checkpoint stores)."""

    iteration: int
    maps: tuple[Tensor, Tensor]  # the joined half maps (rfft half-grids of the working box)
    poses: tuple[PoseTable, PoseTable] | None
    sigma2: Tensor  # (G, shells): the noise spectrum the next search weighs by
    band_px: float  # the next search's band
    step_deg: float  # the particles' median accuracy σ (≥ 0.1°, ≤ the last step): sets the next step
    fsc_mean: float  # the mean half-map FSC after the iteration
    stalled: int  # iterations in a row that raised it by less than _STALLED and moved < _MOVED of the poses
    done: bool  # the last iteration (at Nyquist) is done
    halves: tuple[HalfState, HalfState] | None = None  # the map update's states (prior; sgd: optimiser)
    fsc_stalls: int = 0  # iterations in a row that raised the mean half-map FSC by less than _STALLED


@dataclass(frozen=True)
class RefineInput:
    """Everything read and checked before any output is written."""

    star: Path
    table: ParticleTable
    stack: ImageStack
    grid: FourierGrid
    halves: tuple[np.ndarray, np.ndarray]
    reference: Tensor  # [z, y, x] at the working box and pixel, low-passed
    mask: Tensor  # [z, y, x] soft mask at the working box
    group: Tensor  # (G, 3, 3) symmetry operators
    files: tuple[Path, ...]

    @cached_property
    def radius_A(self) -> float:
        """The particle's radius: the farthest voxel of the mask (above 1 %) from the box's centre (Å)."""
        return support_radius_px(self.mask) * self.grid.work_pixel_A

    @classmethod
    def read(cls, star: str | Path, reference: str | Path, settings: RefineSettings,
             mask: str | Path | None = None, pixel_A: float | None = None) -> RefineInput:
        table = read_particles(star, pixel_A=pixel_A)
        if not table.has_ctf:
            raise InputError(star, "no CTF columns (rlnDefocusU …): refinement needs each particle's CTF")
        if settings.local:
            table.require_poses()
        stack = ImageStack(table)
        grid = FourierGrid.create(stack.box_px, table.pixel_A, settings.work_box_px, source=stack.paths[0])
        _check_join_res(settings, grid)
        group = symmetry_group(settings.sym)
        _check_global_grid(settings, group)
        halves = tuple(split_halves(table, settings.seed))
        files = (Path(star), *stack.paths, Path(reference), *(() if mask is None else (Path(mask),)))
        return cls(Path(star), table, stack, grid, halves, _reference(reference, grid, settings.ini_res_A),
                   _mask(mask, settings, grid), group, files)

    def identity(self, settings: RefineSettings) -> dict:
        """What a checkpoint is resumed only with (as :meth:`ReconstructionInput.identity`)."""
        return {"star": str(self.star.resolve()), "particles": self.table.digest(), "stacks": self.stack.files(),
                "settings": {**settings.identity(), "schedule": _SCHEDULE}}


def min_join_res_A(work_pixel_A: float) -> float:
    """The finest ``join_res_A`` allowed: 1.5 × the Nyquist resolution, so that the half maps stay
    independent over the top third of the band's shells at least, where their FSC sets the
    resolution. (Joined everywhere, they agree everywhere, and report Nyquist whatever the data
    hold.)"""
    return 1.5 * 2 * work_pixel_A


def _check_join_res(settings: RefineSettings, grid: FourierGrid) -> None:
    limit_A = min_join_res_A(grid.work_pixel_A)
    if settings.join_res_A < limit_A:
        raise InputError(None, f"--join-res {settings.join_res_A:g}: finer than {limit_A:g} Å, 1.5 × Nyquist; the "
                               "half maps would be averaged over most of the band, and their FSC could not measure "
                               "the resolution (RELION's default: 40 Å)")


def _check_global_grid(settings: RefineSettings, group: Tensor) -> None:
    """A global search needs rotations in the asymmetric unit; a coarse grid of a large group has none."""
    if settings.local or len(symmetry_grid(settings.global_order, group)):
        return
    usable = next(o for o in range(settings.global_order + 1, 5) if len(symmetry_grid(o, group)))
    raise InputError(None, f"global_order {settings.global_order} with --sym {settings.sym}: no rotation of its "
                           f"grid lies in the asymmetric unit; use {usable} or more")


def _reference(path: str | Path, grid: FourierGrid, ini_res_A: float) -> Tensor:
    """The reference resampled to the working box and pixel, low-passed to ``ini_res_A``."""
    volume, voxel_A = read_map(path)
    if not np.any(volume):
        raise InputError(path, "the reference is all zero")
    size_A = volume.shape[0] * voxel_A
    if not 0.25 < size_A / (grid.box_px * grid.pixel_A) < 4:
        raise InputError(path, f"a box of {size_A:.0f} Å ({volume.shape[0]} × {voxel_A:g} Å) cannot be resampled "
                               f"to the particles' {grid.box_px * grid.pixel_A:.0f} Å")
    n, pixel = grid.work_box_px, grid.work_pixel_A
    volume = resample(torch.as_tensor(volume, dtype=torch.float64), voxel_A, n, pixel)
    return low_pass(volume, pixel, max(ini_res_A, 2 * pixel))


def sphere_mask(diameter_A: float | None, grid: FourierGrid) -> Tensor:
    """The default mask at the working box: a soft sphere of the particle diameter (default 0.8 ×
    the box), its raised-cosine edge n/32 pixels wide (at least 2)."""
    n = grid.work_box_px
    return soft_sphere(n, mask_radius_px(diameter_A, grid), edge_px=max(2.0, n / 32))


def _mask(path: str | Path | None, settings: RefineSettings, grid: FourierGrid) -> Tensor:
    """The user's mask at the working box, or :func:`sphere_mask`."""
    n, pixel = grid.work_box_px, grid.work_pixel_A
    if path is None:
        return sphere_mask(settings.particle_diameter_A, grid)
    volume, voxel_A = read_map(path, need_voxel_size=False)
    work_box = f" or the working box {n} (--box)" if n != grid.box_px else ""
    if volume.shape[0] not in (grid.box_px, n):
        raise InputError(path, f"a mask of box {volume.shape[0]}: expected the particles' box {grid.box_px}{work_box}")
    if volume.shape[0] == grid.box_px:
        check_voxel_size(path, voxel_A, grid.pixel_A, "the particles'")
    else:
        check_voxel_size(path, voxel_A, pixel, f"the working box's (--box {n})")
    if not volume.max() > 0:
        raise InputError(path, "the mask is all zero")
    mask = torch.as_tensor(volume, dtype=torch.float64)
    if mask.shape[0] != n:
        mask = resample(mask, grid.pixel_A, n, pixel)
    return mask.clamp(0, 1)


@dataclass(frozen=True)
class RefineResult:
    out_dir: Path
    fsc: FSCCurve
    metrics: list[dict]

    @property
    def resolution_A(self) -> float:
        return self.fsc.resolution_at(0.143)


def refine(inputs: RefineInput, out_dir: str | Path, settings: RefineSettings = RefineSettings(), *,
           resume: bool = False, device=None, dtype: torch.dtype = torch.float32, progress=Silent()) -> RefineResult:
    """Gold-standard refinement of ``inputs``' particles from its reference into ``out_dir``."""
    engine = ReconstructionSettings(method="running-diag", batch_size=settings.batch_size, interp=settings.interp,
                                    work_box_px=settings.work_box_px, store=settings.store,
                                    store_dtype=settings.store_dtype, seed=settings.seed)
    halves = [HalfSet(inputs.table.subset(index), inputs.stack.subset(index), inputs.grid, engine, h, device, dtype)
              for h, index in enumerate(inputs.halves, start=1)]
    run = _Run(Path(out_dir), inputs.identity(settings))
    state, metrics = run.load(device) if resume else (None, [])
    progress.total(settings.max_iter)
    if state is None:
        state = _start(halves, inputs, settings)
    elif state.done:
        progress.line(f"the run in {out_dir} had finished at iteration {state.iteration}: its outputs are written "
                      "again (a finished run is not reopened, whatever --max-iter)")
    while not state.done:
        start = time.perf_counter()
        state, row = _iterate(halves, inputs, settings, state)
        metrics = metrics + [{**row, "seconds": time.perf_counter() - start}]
        run.save(state, metrics)
        progress.advance()
        progress.line(_line(metrics[-1]))
    return _write_outputs(run.out_dir, halves, inputs, state, metrics)


def _start(halves: list[HalfSet], inputs: RefineInput, settings: RefineSettings) -> RefineState:
    """Iteration 0: the masked reference for both halves, σ² from the images' power spectrum,
    the first band from ``ini_res_A``; with ``local``, the STAR file's poses."""
    grid, device = inputs.grid, halves[0].device
    complex_dtype = torch.promote_types(halves[0].dtype, torch.complex64)
    x = masked_ft(map_to_ft(inputs.reference), inputs.mask).to(device, complex_dtype)
    band = min(grid.work_box_px / 2 - 1, math.ceil(grid.box_px * grid.pixel_A / settings.ini_res_A) + 1)
    poses = tuple(_table_poses(h) for h in halves) if settings.local else None
    step = 1.0 if settings.local else angular_step_deg(settings.global_order) / 2  # the poses' σ, assumed
    return RefineState(0, (x, x), poses, _image_power(halves), float(band), step, 0.0, 0, False)


def _image_power(halves: list[HalfSet]) -> Tensor:
    """σ² per optics group and image shell from the images themselves (the residual to a zero
    map): an upper bound of the noise (it holds the signal too), good enough for a first search."""
    sums = counts = 0.0
    for h in halves:
        objective, zero, groups = LeastSquares(h.model, 0.0), h.zeros(), len(h.table.optics)
        s, c = h.pass_mean(lambda batch: residual_power(objective, zero, batch, groups))
        sums, counts = sums + s * len(h), counts + c * len(h)
    return sums / counts.clamp(min=1)[:, None]


def _table_poses(half: HalfSet) -> PoseTable:
    """The STAR file's poses as one candidate per particle (``local``)."""
    rotations = euler_to_matrix(torch.as_tensor(half.table.angles_deg, dtype=torch.float64))
    ones = torch.ones(len(half), 1, dtype=half.dtype, device=half.device)
    return PoseTable(rotations[:, None].to(half.device, half.dtype),
                     torch.as_tensor(half.table.shift_A, dtype=half.dtype, device=half.device)[:, None],
                     0 * ones, ones, 2.0 * ones[:, 0])


@dataclass(frozen=True)
class _Plan:
    """What the searches of one iteration do; ``grid``: the global search's rotations, or None
    for local searches only."""

    iteration: int
    band_px: float
    step_deg: float
    sigma2: Tensor
    grid: Tensor | None
    settings: RefineSettings
    group: Tensor
    radius_A: float  # the particle's radius: the local search's coarse levels score the bands it allows
    last: bool = False  # the last iteration (at Nyquist)

    @property
    def k(self) -> int:
        """Poses per particle."""
        if self.posterior:
            return self.settings.soft_poses
        return self.settings.top_k if self.grid is not None else self.settings.local_k

    @property
    def posterior(self) -> bool:
        """Whether the searches end on the posterior grid (:func:`posterior_grid`)."""
        return _on_grid(self.iteration, self.last, self.settings)

    @property
    def start_k(self) -> int:
        """Poses per particle that a local search starts from: the best alone after an
        iteration that ended on the posterior grid (its other poses are the best one's
        neighbours), else ``local_k``."""
        after_grid = self.iteration > 1 and _on_grid(self.iteration - 1, False, self.settings)
        return 1 if after_grid else self.settings.local_k

    @property
    def levels(self) -> int:
        """Local-search levels: two after a global search, one without (:func:`_first_step_deg`)."""
        return _LEVELS if self.grid is not None else 1

    @property
    def final_step_deg(self) -> float:
        return self.step_deg / 2 ** (self.levels - 1)

    @property
    def temperature(self) -> float:
        """τ of the posterior weights: 3 and 2 in iterations 1 and 2, else 1; on the posterior
        grid ``_GRID_TEMPERATURE``."""
        if self.posterior:
            return _GRID_TEMPERATURE
        if self.iteration > len(_TEMPERATURES):
            return 1.0
        return _TEMPERATURES[self.iteration - 1]


def _on_grid(iteration: int, last: bool, settings: RefineSettings) -> bool:
    """Whether iteration ``iteration``'s searches end on the posterior grid: with ``soft_poses``
    > 1, the last iteration and every one without a global search."""
    local = settings.local or iteration > _GLOBAL_ITERATIONS
    return settings.soft_poses > 1 and (last or local)


def _iterate(halves: list[HalfSet], inputs: RefineInput, settings: RefineSettings, state: RefineState):
    """One iteration: search, update, join. Returns the new state and its metrics row."""
    n, grid = state.iteration + 1, inputs.grid
    last = n >= settings.max_iter or _converged(state, grid)
    band = grid.work_box_px / 2 - 1 if last else state.band_px
    device, dtype = halves[0].device, halves[0].dtype
    search_grid = symmetry_grid(settings.global_order, inputs.group.to(device, dtype)).matrices \
        if n <= _GLOBAL_ITERATIONS and not settings.local else None
    plan = _Plan(n, band, _first_step_deg(state, search_grid is not None, settings), state.sigma2, search_grid,
                 settings, inputs.group, inputs.radius_A, last)
    references = [masked_ft(x, inputs.mask.to(x.device)) for x in state.maps]
    # em updates use the frequencies within twice the band; sgd's keep the whole disc (later
    # iterations step from their states)
    radius = _update_radius(band, grid) if settings.update == "em" else grid.work_box_px / 2 - 1
    if settings.update == "sgd" and 1 < n and not last:
        found = [_Found.of(h, plan.k) for h in halves]
        stepped = [_sgd_update(h, s, x, plan, prev, f, inputs.mask) for h, s, x, prev, f in
                   zip(halves, state.halves, state.maps, state.poses, found)]
        maps, states = [s.x for s in stepped], stepped
    else:
        found = [_search_half(h, x, plan, prev) for h, x, prev in zip(halves, references, state.poses or (None, None))]
        maps, states = _em_update([h.within(radius) for h in halves], [f.table() for f in found], inputs.group,
                                  state.sigma2)
    poses = [f.table() for f in found]
    maps = _join(maps, grid, settings.join_res_A)
    states = [replace(s, x=x) for s, x in zip(states, maps)]
    curve = _measured_within(half_map_fsc(*maps, grid, settings.interp), radius)
    resolution = curve.resolution_at(0.143)
    accuracy = float(torch.cat([p.sigma_deg for p in poses]).nan_to_num(posinf=90.0).median())
    sigma2 = _pooled_sigma2(found) if n > 1 else state.sigma2
    row = {"iteration": n, "band_px": band, "band_A": grid.box_px * grid.pixel_A / band, "update_px": radius,
           "step_deg": plan.step_deg,
           "final_step_deg": plan.final_step_deg, "changed": _changed(state.poses, poses, plan.final_step_deg),
           "accuracy_deg": accuracy, "best_probability": float(torch.cat([p.weight[:, 0] for p in poses]).median()),
           "resolution_A": resolution, "fsc_mean": curve.mean(), "fsc": [float(v) for v in np.nan_to_num(curve.fsc)],
           "update": "em" if settings.update == "em" or n == 1 or last else "sgd"}
    stalled, fsc_stalls = _stalls(state, curve.mean(), row["changed"])
    # a stalled em iteration at Nyquist on the posterior grid is what the last one would repeat
    final = last or (row["update"] == "em" and n >= 3 and _has_stalled(stalled, fsc_stalls) and plan.posterior
                     and band >= grid.work_box_px / 2 - 1)
    return RefineState(n, tuple(maps), tuple(poses), sigma2, _next_band(curve, grid, settings, state.band_px),
                       min(max(accuracy, 0.1), plan.step_deg), curve.mean(), stalled, final, tuple(states),
                       fsc_stalls), row


def _first_step_deg(state: RefineState, after_global: bool, settings: RefineSettings) -> float:
    """The local search's first step. Poses from a grid need a search that reaches across its
    cells, whatever the last accuracy: at least a quarter of the grid's step, in two levels. In
    the iterations without a global search, one level of twice the particles' accuracy σ: the
    scores at ±2σ still lie on the log-likelihood's parabola (2 units below its peak), and the
    search reaches the particles that are 2σ off (box 64: 2.48° against 2.56° with two levels
    from σ, in 60 % of the time)."""
    if after_global:
        return max(state.step_deg, angular_step_deg(settings.global_order) / 4)
    return 2 * state.step_deg


def _stalls(state: RefineState, fsc_mean: float, changed: float) -> tuple[int, int]:
    """The stall counts of :class:`RefineState` after the iteration that ends with ``fsc_mean``
    (the mean half-map FSC) and ``changed`` (the fraction of moved poses): iterations in a row
    that raised the FSC by less than ``_STALLED`` and moved fewer than ``_MOVED`` of the poses,
    and iterations in a row that raised the FSC by less than ``_STALLED``."""
    flat = fsc_mean <= state.fsc_mean + _STALLED
    return (state.stalled + 1 if flat and changed < _MOVED else 0), (state.fsc_stalls + 1 if flat else 0)


def _has_stalled(stalled: int, fsc_stalls: int) -> bool:
    """Whether a run with these stall counts has stalled (:func:`_converged`)."""
    return stalled >= 1 or fsc_stalls >= _FSC_PATIENCE


def _converged(state: RefineState, grid: FourierGrid) -> bool:
    """From iteration 3: the last iteration raised the mean half-map FSC by less than
    ``_STALLED`` and moved fewer than ``_MOVED`` of the best poses by more than its final step:
    neither the maps nor the poses improve. The FSC alone stops too early: as the particles'
    accuracy σ shrinks, so does their posterior grid and the noise it averages, and the half
    maps' FSC stalls while the poses still improve (box 64: 2.49° at the FSC's stall, 2.34°
    three iterations later, the FSC to the truth 0.948 → 0.946). Poses that never settle (junk
    particles wandering between poses) do not keep a run going: ``_FSC_PATIENCE`` iterations in
    a row without the FSC rising stop it too."""
    return state.iteration >= 3 and _has_stalled(state.stalled, state.fsc_stalls)


def _update_radius(band_px: float, grid: FourierGrid) -> float:
    """The image frequencies an ``em`` update back-projects: twice the search band, at most
    Nyquist (as RELION's ``current_size``). The half-map FSC then reaches beyond the band, so
    the band can grow, and the early iterations' passes cost a fraction of a full one."""
    return min(grid.work_box_px / 2 - 1, 2 * band_px)


def _measured_within(curve: FSCCurve, radius_px: float) -> FSCCurve:
    """The FSC with 0 beyond the update's radius: the maps hold no data there, and what the
    curve shows (the gridding correction's spread of the shells below) must not count."""
    fsc_values = curve.fsc.copy()
    fsc_values[math.floor(radius_px) + 1:] = 0.0
    return replace(curve, fsc=fsc_values)


def _next_band(curve: FSCCurve, grid: FourierGrid, settings: RefineSettings, band: float) -> float:
    """The FSC-0.143 shell plus the margin; never lower than before; at most Nyquist."""
    below = np.nonzero(~(curve.fsc[1:] >= 0.143))[0]
    shell = len(curve.fsc) - 1 if len(below) == 0 else int(below[0])
    return float(min(grid.work_box_px / 2 - 1, max(band, shell + settings.band_margin_px)))


class _Found:
    """Collects the poses found for this rank's particles of a half, and the residual power of
    the best poses of its noise sample (``sample (n,)`` bool, for σ²); :meth:`table` adds up
    all ranks' shares."""

    def __init__(self, n: int, k: int, device, dtype, sample: np.ndarray, noise_shape: tuple[int, int]):
        self.n, self.k, self.device, self.dtype, self.sample = n, k, device, dtype, sample
        self.parts: list[tuple[np.ndarray, Candidates, Tensor, Tensor]] = []
        self.power = torch.zeros(noise_shape, dtype=torch.float64, device=device)
        self.counts = torch.zeros(noise_shape[0], dtype=torch.float64, device=device)
        self._table = None

    @classmethod
    def of(cls, half: HalfSet, k: int) -> _Found:
        groups = half.table.optics_group
        shells = int(half.grid.shell_px.max()) + 1
        return cls(len(half), k, half.device, half.dtype, noise_sample(groups), (len(half.table.optics), shells))

    def put(self, index: np.ndarray, found: Candidates, weight: Tensor, sigma_deg: Tensor) -> None:
        self.parts.append((index, found, weight, sigma_deg))

    def table(self) -> PoseTable:
        if self._table is None:
            full = [torch.zeros(self.n, self.k, *shape, dtype=self.dtype, device=self.device)
                    for shape in ((3, 3), (2,), (), ())] + [torch.zeros(self.n, dtype=self.dtype, device=self.device)]
            for index, found, weight, sigma in self.parts:
                rows = torch.as_tensor(index, device=self.device)
                width = weight.shape[1]
                for target, value in zip(full, (found.rotations, found.shift_A, found.log_likelihood, weight)):
                    target[rows, :width] = value.to(self.dtype)
                full[4][rows] = sigma.to(self.dtype)
            self._table = PoseTable(*dist.all_reduce_sums(*full))
        return self._table


def _search_half(half: HalfSet, reference: Tensor, plan: _Plan, previous: PoseTable | None) -> _Found:
    """The poses of every particle of the half against ``reference`` (one pass)."""
    found = _Found.of(half, plan.k)
    for batch in half.parts(None):
        _search_batch(half, batch, reference, plan, previous, found)
    return found


def _search_batch(half: HalfSet, batch: Batch, reference: Tensor, plan: _Plan, previous: PoseTable | None,
                  found: _Found) -> tuple[Candidates, Tensor]:
    """Search the images of ``batch``, record their poses in ``found``, and return them with
    their ``(B, K)`` posterior weights."""
    settings, pixel = plan.settings, half.grid.work_pixel_A
    images = BandImages.of(batch, half.grid, plan.band_px, plan.sigma2)
    rows_index = torch.as_tensor(batch.index, device=half.device)
    live = None  # the candidates to refine: all, but for the last poses without posterior weight
    if plan.grid is not None and previous is None:  # the first search: the reference's greyscale is unknown
        reach_A = settings.max_shift_A or 5 * half.grid.pixel_A
        shifts = shift_grid(reach_A, pixel, dtype=half.dtype, device=half.device)
        start = global_search(reference, images, plan.grid, shifts, top_k=settings.top_k, scale_profiled=True,
                              interp=settings.interp)
    elif plan.grid is not None:  # once more with the last map, origins near the last ones, on a capped band
        shifts = local_shift_grid(previous.shift_A[rows_index, 0], pixel)
        band = BandImages.of(batch, half.grid, min(plan.band_px, _GLOBAL_BAND_PX), plan.sigma2)
        start = global_search(reference, band, plan.grid, shifts, top_k=settings.local_k, interp=settings.interp)
    else:
        start = previous.candidates(rows_index, plan.start_k)
        live = previous.weight[rows_index, :start.rotations.shape[1]] > 0
    step_A = pixel * plan.step_deg / angular_step_deg(settings.global_order)
    candidates, sigma = local_search(reference, images, start, step_deg=plan.step_deg, step_A=step_A,
                                     levels=plan.levels, radius_A=plan.radius_A, interp=settings.interp,
                                     live=live)
    candidates = _distinct(candidates, plan.final_step_deg, step_A / 2 ** (plan.levels - 1))
    candidates, order = candidates.best_first()
    sigma = torch.take_along_dim(sigma, order, 1)[:, 0]
    if plan.posterior:  # the grid around the best pose (a second, weaker basin's pose is dropped)
        grid_step_deg = _SPREAD * sigma.nan_to_num(posinf=plan.step_deg).clamp(0.1, plan.step_deg)
        candidates = posterior_grid(reference, images, candidates, grid_step_deg, keep=plan.k, interp=settings.interp)
    weight = posterior_weights(candidates.log_likelihood.double(), plan.temperature,
                               particle_ids=torch.as_tensor(batch.index))
    if batch.weight is None or bool(batch.weight.any()):  # not the empty share of this rank
        found.put(batch.index, candidates, weight, sigma)
    pick = torch.as_tensor(np.flatnonzero(found.sample[batch.index]), device=half.device)
    if len(pick):
        ones = torch.ones(len(pick), 1, dtype=weight.dtype, device=weight.device)
        best = weighted_rows(batch.take(pick), candidates.first(pick), ones, plan.group[:1]).batch()
        power, counts = residual_power(LeastSquares(half.model, 0.0), reference, best, len(half.table.optics))
        found.power, found.counts = found.power + power, found.counts + counts
    return candidates, weight


def noise_sample(groups: np.ndarray, size: int = _NOISE_IMAGES) -> np.ndarray:
    """``(N,)`` bool: the images whose best-pose residuals re-estimate σ², ``size`` of each
    optics group (all of a smaller one) drawn with a fixed seed, so that the sample does not
    depend on how many processes share the particles. σ² per shell is a mean over thousands
    of pixels per image: a few thousand images pin it, and the residual pass over all of them
    would cost a tenth of an iteration."""
    rng = np.random.default_rng(0)
    sample = np.zeros(len(groups), dtype=bool)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        sample[rng.choice(members, min(size, len(members)), replace=False)] = True
    return sample


def _distinct(candidates: Candidates, step_deg: float, step_A: float) -> Candidates:
    """Candidates that refined onto a better one (within a final step in rotation and shift)
    get log-likelihood −inf: the same pose must not be counted twice."""
    rotations, shifts, scores = candidates.rotations, candidates.shift_A, candidates.log_likelihood
    close = (geodesic_distance_deg(rotations[:, :, None], rotations[:, None]) <= step_deg) & \
        ((shifts[:, :, None] - shifts[:, None]).norm(dim=-1) <= step_A)
    k = torch.arange(scores.shape[1], device=scores.device)
    better = (scores[:, None, :] > scores[:, :, None]) | ((scores[:, None, :] == scores[:, :, None]) & (k[None, :] < k[:, None]))
    # better[b, k, j]: candidate j is preferred to candidate k
    duplicate = (close & better).any(-1)
    return replace(candidates, log_likelihood=scores.masked_fill(duplicate, -torch.inf))


def _em_update(halves: list[HalfSet], poses: list[PoseTable], group: Tensor, sigma2: Tensor):
    """One pass per half over its (image, pose) rows (:class:`WeightedRows`: an image's values
    are held once, whatever its poses and symmetry mates): each half's one-pass map under the
    Wiener prior from the FSC of the two."""
    def rows_of(table: PoseTable):
        def rows(batch: Batch, x) -> WeightedRows:
            index = torch.as_tensor(batch.index, device=table.weight.device)
            candidates = table.candidates(index, table.weight.shape[1])
            return weighted_rows(batch, candidates, table.weight[index], group)
        return rows

    states = [initial_state(h, data_terms(h, sigma2, rows=rows_of(p)), sigma2) for h, p in zip(halves, poses)]
    ssnr = ssnr_between(*(one_pass_map(h, s) for h, s in zip(halves, states)))
    states = [with_prior(h, s, ssnr) for h, s in zip(halves, states)]
    return [one_pass_map(h, s) for h, s in zip(halves, states)], states


def _sgd_update(half: HalfSet, state: HalfState, x: Tensor, plan: _Plan, previous: PoseTable, found: _Found,
                mask: Tensor) -> HalfState:
    """One epoch of Algorithm 1 from ``x``, each minibatch's poses searched against the current
    (masked) map first."""
    def rows(batch: Batch, current: Tensor) -> Batch:
        found_here = _search_batch(half, batch, masked_ft(current, mask.to(current.device)), plan, previous, found)
        return weighted_rows(batch, *found_here, plan.group).batch()

    stepped, _ = run_epoch(half, replace(state, x=x), plan.iteration, rows=rows)
    return stepped


def _pooled_sigma2(found: list[_Found]) -> Tensor:
    """σ² per group and shell from both halves' best-pose residuals (all ranks)."""
    power, counts = dist.all_reduce_sums(sum(f.power for f in found), sum(f.counts for f in found))
    return power / counts.clamp(min=1)[:, None]


def _join(maps: list[Tensor], grid: FourierGrid, join_res_A: float) -> list[Tensor]:
    """Both half maps with their mean below ``join_res_A`` (the gold standard's shared low band)."""
    low = (shell_index(grid.work_box_px, maps[0].device) < grid.box_px * grid.pixel_A / join_res_A)
    mean = 0.5 * (maps[0] + maps[1])
    return [torch.where(low, mean, x) for x in maps]


def _changed(before: tuple[PoseTable, PoseTable] | None, after: list[PoseTable], step_deg: float) -> float:
    """Fraction of particles whose best rotation moved by more than the search's final step."""
    if before is None:
        return 1.0
    moved = [geodesic_distance_deg(a.rotations[:, 0], b.rotations[:, 0]) > step_deg for a, b in zip(after, before)]
    return float(torch.cat(moved).float().mean())


def _line(row: dict) -> str:
    return (f"iteration {row['iteration']} ({row['update']}): band {row['band_A']:.1f} Å, step "
            f"{row['step_deg']:.2f}° → {row['final_step_deg']:.2f}°, {100 * row['changed']:.0f} % of poses moved, "
            f"accuracy {row['accuracy_deg']:.2f}°, half-map resolution {row['resolution_A']:.2f} Å, "
            f"{row['seconds']:.0f} s")


@dataclass
class _Run:
    """``checkpoint.pt`` and ``metrics.jsonl`` of a refinement (rank 0 writes)."""

    out_dir: Path
    identity: dict

    @property
    def path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def load(self, device) -> tuple[RefineState, list[dict]]:
        saved = load_resumable(self.path, self.identity, [RefineState, PoseTable, HalfState, DataTerms,
                                                          HutchinsonState, ArmijoState, RunningDiagonalState], device)
        return saved["state"], saved["metrics"]

    def save(self, state: RefineState, metrics: list[dict]) -> None:
        if dist.is_main():
            save_checkpoint(self.path, {"identity": self.identity, "state": state, "metrics": metrics})
            write_lines(self.out_dir / "metrics.jsonl",
                        [json.dumps({k: v for k, v in m.items() if k != "fsc"}) for m in metrics])


def _write_outputs(out_dir: Path, halves: list[HalfSet], inputs: RefineInput, state: RefineState,
                   metrics: list[dict]) -> RefineResult:
    """half1.mrc, half2.mrc, map.mrc, fsc.csv, fsc_iterations.csv and particles.star (rank 0)."""
    grid, interp = inputs.grid, halves[0].settings.interp
    maps = [map_of(x, grid, interp) for x in (*state.maps, joint_map(halves, list(state.halves)))]
    curve = fsc(maps[0], maps[1], grid.work_pixel_A)
    if dist.is_main():
        for name, volume in zip(("half1.mrc", "half2.mrc", "map.mrc"), maps):
            write_map(out_dir / name, volume, grid.work_pixel_A)
        write_lines(out_dir / "fsc.csv", ["shell,resolution_A,fsc"] + [
            f"{i},{r:.4f},{f:.6f}" for i, (r, f) in enumerate(zip(curve.resolution_A, curve.fsc))])
        write_lines(out_dir / "fsc_iterations.csv", ["iteration,shell,resolution_A,fsc"] + [
            f"{m['iteration']},{i},{curve.resolution_A[i]:.4f},{f:.6f}" for m in metrics for i, f in enumerate(m["fsc"])])
        write_particles(out_dir / "particles.star", refined_table(inputs, state))
    return RefineResult(out_dir, curve, metrics)


def refined_table(inputs: RefineInput, state: RefineState) -> ParticleTable:
    """The input table with each particle's best pose, its half-set, and RELION's columns for
    the best pose's probability, the number of poses it was spread over, and its log-likelihood."""
    table = inputs.table
    n = len(table)
    angles, shifts = np.zeros((n, 3)), np.zeros((n, 2))
    probability, significant, score = np.zeros(n), np.zeros(n, dtype=int), np.zeros(n)
    subset = np.zeros(n, dtype=int)
    for h, (index, poses) in enumerate(zip(inputs.halves, state.poses), start=1):
        angles[index] = matrix_to_euler(poses.rotations[:, 0].double().cpu()).numpy()
        shifts[index] = poses.shift_A[:, 0].double().cpu().numpy()
        probability[index] = poses.weight[:, 0].double().cpu().numpy()
        significant[index] = (poses.weight > 0).sum(1).cpu().numpy()
        score[index] = poses.log_likelihood[:, 0].double().cpu().numpy()
        subset[index] = h
    extra = {**table.extra, "rlnMaxValueProbDistribution": [f"{v:.6f}" for v in probability],
             "rlnNrOfSignificantSamples": [str(v) for v in significant],
             "rlnLogLikeliContribution": [f"{v:.6g}" for v in score]}
    return replace(table, angles_deg=angles, shift_A=shifts, random_subset=subset, extra=extra)
