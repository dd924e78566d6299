"""``cryosgd abinitio``: a map from particles alone, by SGD with poses searched on every minibatch.

After cryoSPARC's ab initio and RELION's VDAM, with cryosgd's preconditioner (docs/abinitio.md):

- The images are Fourier-cropped to the box whose Nyquist is 2/3 of the final resolution (the
  final passes' band); the map starts as random Gaussian blobs inside the particle's sphere, low-passed
  to the starting resolution.
- Step t takes the next minibatch (``batch_size`` images on average, growing 3× from the
  first to the last, ``epochs`` passes over the particles in at least 30 steps) and
  the band ``r_t`` that marches linearly from ``start_res_A`` to ``end_res_A``; every image is
  searched globally against the current map on that band (HEALPix order 1, 30°, while the band
  is at most 8 pixels, order 2 beyond; origins on a 1-pixel grid), with scores that are blind to
  the map's greyscale (scale-profiled). Weights over each image's ``top_k`` poses are a softmax
  whose temperature is set on each minibatch so that the best pose holds, on average, a share
  that anneals from 2/K to 0.95 over the first 70 % of the steps (cryoSPARC anneals its noise
  scale from 1 % significant poses).
- The weighted (image, pose) rows give the minibatch's gradient and its curvature H·1 in one
  scatter, on the band's frequencies only; the step is ``learning_rate`` (0.5) times the
  gradient over the running average of those curvatures (``ScaleByRunningDiagonal``, the
  transform of refinement's ``sgd`` update, with H·1: about the Newton step of a map that is
  smooth on the voxel scale, the curvature RELION's VDAM divides by). A fixed rate, as
  cryoSPARC's and VDAM's ab initio: a line search on small minibatches would solve each
  minibatch alone.
- After the last step every particle is searched against the final map on the final band
  (globally, then locally); then, twice, its poses are refined locally on the working box's
  whole band against the one-pass map of the last poses (a one-pass map Wiener-filtered by
  the FSC of odd and even particles, as refinement's ``em`` update). The last one-pass map
  is ``initial.mrc`` and the last poses are ``particles.star``: from SGD's 12 Å map alone, the
  poses are about twice as far from the truth (docs/abinitio.md).
- After each step the map is multiplied by the soft sphere, its negative density removed, and
  it is recentred on its centre of mass.

The hand of the map cannot be determined from projections: a map and its mirror image explain
them equally well. ``flip_hand`` mirrors the result (``cryosgd flip MAP`` does it to any map).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryosgd import dist
from cryosgd.conventions import ft_to_map, map_to_ft, matrix_to_euler
from cryosgd.data.batch import Batch, make_batch
from cryosgd.data.particles import ParticleTable, read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.data.store import ParticleStore
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid, shell_index
from cryosgd.fourier.maps import centre_of_mass_px, low_pass_ft, masked_ft, pad_ft, shift_ft, soft_sphere
from cryosgd.io.atomic import write_lines
from cryosgd.io.checkpoint import load_resumable, save_checkpoint
from cryosgd.io.mrc import write_map
from cryosgd.model.forward import ForwardModel
from cryosgd.objective.loss import LeastSquares
from cryosgd.objective.diagonal import shell_means
from cryosgd.objective.noise import noise_weight, residual_power, spectra
from cryosgd.optim.precondition import RunningDiagonalState, Scale, ScaleByRunningDiagonal
from cryosgd.optim.base import Chain, chain
from cryosgd.pose.scores import band_mask, posterior_weights
from cryosgd.pose.search import BandImages, PoseTable, global_search, local_search, weighted_rows
from cryosgd.pose.shifts import shift_grid
from cryosgd.pose.so3 import uniform_rotations
from cryosgd.recon.gold_standard import map_of, ssnr_between
from cryosgd.recon.known_pose import minibatch_step, ssnr_per_shell
from cryosgd.recon.reconstruct import Silent
from cryosgd.recon.settings import AbInitioSettings, mask_radius_px

OUTPUTS = ("initial.mrc", "particles.star", "metrics.jsonl", "checkpoint.pt")
HAND = ("the hand of the map cannot be determined from projections; check it against a known feature "
        "(e.g. an α-helix) and mirror it with --flip-hand or `cryosgd flip MAP` if needed")
_FINAL_RES_FACTOR = 2 / 3  # the final passes refine poses and map to this fraction of --end-res
_CHECKPOINT_EVERY = 20  # steps
_LOCAL_PASSES = 2  # final passes of local refinement against the one-pass map of the last poses


@dataclass(frozen=True)
class AbInitioInput:
    star: Path
    table: ParticleTable
    stack: ImageStack
    grid: FourierGrid  # the working grid: Nyquist at the final resolution
    files: tuple[Path, ...]

    @classmethod
    def read(cls, star: str | Path, settings: AbInitioSettings, pixel_A: float | None = None) -> AbInitioInput:
        table = read_particles(star, pixel_A=pixel_A)
        if not table.has_ctf:
            raise InputError(star, "no CTF columns (rlnDefocusU …): ab initio needs each particle's CTF")
        stack = ImageStack(table)
        box_A = stack.box_px * table.pixel_A
        work = min(stack.box_px, 2 * (math.ceil(box_A / (settings.end_res_A * _FINAL_RES_FACTOR)) + 2))
        FourierGrid.create(stack.box_px, table.pixel_A, source=stack.paths[0])  # the box itself is usable
        grid = FourierGrid.create(stack.box_px, table.pixel_A, work)
        return cls(Path(star), table, stack, grid, (Path(star), *stack.paths))

    def identity(self, settings: AbInitioSettings) -> dict:
        return {"star": str(self.star.resolve()), "particles": self.table.digest(), "stacks": self.stack.files(),
                "settings": settings.identity()}


@dataclass(frozen=True)
class AbInitioState:
    step: int
    x: Tensor
    optimizer: tuple
    sigma2: Tensor
    poses: PoseTable  # the last poses found for each particle (weight 0 where not yet seen)


@dataclass(frozen=True)
class AbInitioResult:
    out_dir: Path
    metrics: list[dict]


@dataclass(frozen=True)
class _Schedule:
    """Step t's minibatch, band and target share of the best pose."""

    settings: AbInitioSettings
    grid: FourierGrid
    n_particles: int

    @property
    def steps(self) -> int:
        return max(30, math.ceil(self.settings.epochs * self.n_particles / self.settings.batch_size))

    def fraction(self, t: int) -> float:
        return t / (self.steps - 1)

    def batch_size(self, t: int) -> int:
        """Sizes growing linearly 3× over the steps, adding up to ``epochs`` passes."""
        mean = self.settings.epochs * self.n_particles / self.steps
        return min(self.n_particles, max(8, round(mean * (0.5 + self.fraction(t)))))

    def band_px(self, t: int) -> float:
        box_A = self.grid.box_px * self.grid.pixel_A
        start, end = box_A / self.settings.start_res_A, box_A / self.settings.end_res_A
        return min(self.grid.work_box_px / 2 - 1, start + (end - start) * self.fraction(t))

    def best_share(self, t: int, k: int) -> float:
        f = min(1.0, self.fraction(t) / 0.7)
        return 2 / k + (0.95 - 2 / k) * f

    def batches(self, seed: int) -> list[np.ndarray]:
        """The minibatches of all steps: permutations of the particles, one per epoch, cut in turn."""
        rng = np.random.default_rng([seed, 7])
        order = np.concatenate([rng.permutation(self.n_particles)
                                for _ in range(math.ceil(self.settings.epochs) + 1)])
        ends = np.cumsum([self.batch_size(t) for t in range(self.steps)])
        return [np.sort(order[e - b:e]) for e, b in zip(ends, (self.batch_size(t) for t in range(self.steps)))]


def ab_initio(inputs: AbInitioInput, out_dir: str | Path, settings: AbInitioSettings = AbInitioSettings(), *,
              resume: bool = False, device=None, dtype: torch.dtype = torch.float32,
              progress=Silent()) -> AbInitioResult:
    """An initial map and poses from ``inputs``' particles into ``out_dir``."""
    device = torch.device("cpu") if device is None else torch.device(device)
    grid = inputs.grid
    mask = soft_sphere(grid.work_box_px, mask_radius_px(settings.particle_diameter_A, grid), edge_px=2.0,
                       device=device).to(dtype)
    store_dtype = torch.bfloat16 if settings.store_dtype == "bfloat16" else torch.complex64
    store = ParticleStore(inputs.stack, grid, settings.store, store_dtype, device, dtype)
    schedule = _Schedule(settings, grid, len(inputs.table))
    out_dir = Path(out_dir)
    state, metrics = _load(out_dir, inputs.identity(settings), device) if resume else (None, [])
    if state is None:
        state = _start(inputs, settings, store, mask, device, dtype)
    progress.total(schedule.steps)
    batches = schedule.batches(settings.seed)
    for t in range(state.step, schedule.steps):
        start = time.perf_counter()
        state, row = _step(inputs, settings, schedule, store, mask, state, batches[t], t)
        metrics = metrics + [{**row, "seconds": time.perf_counter() - start}]
        progress.advance()
        if (t + 1) % _CHECKPOINT_EVERY == 0 or t + 1 == schedule.steps:
            _save(out_dir, inputs.identity(settings), state, metrics)
            block = metrics[t // _CHECKPOINT_EVERY * _CHECKPOINT_EVERY:]  # the steps since the last line
            progress.line(_line(block, schedule.steps))
    if state.step == schedule.steps:  # the final search has not been done
        start = time.perf_counter()
        state = _final_search(inputs, settings, store, mask, state, schedule)
        _save(out_dir, inputs.identity(settings), state, metrics)
        progress.line(f"final search of all {len(inputs.table)} particles and {_LOCAL_PASSES} local passes: "
                      f"{time.perf_counter() - start:.1f} s")
    _write_outputs(out_dir, inputs, settings, state)
    progress.line(HAND)
    return AbInitioResult(out_dir, metrics)


def _start(inputs: AbInitioInput, settings: AbInitioSettings, store: ParticleStore, mask: Tensor, device,
           dtype) -> AbInitioState:
    """Random blobs inside the sphere, low-passed to the start resolution; σ² from the images."""
    grid, n = inputs.grid, inputs.grid.work_box_px
    generator = torch.Generator().manual_seed(settings.seed)
    radius = mask_radius_px(settings.particle_diameter_A, grid)
    axis = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    volume = torch.zeros(n, n, n, dtype=torch.float64)
    sigma = max(1.0, settings.start_res_A / grid.work_pixel_A / 4)
    for _ in range(12):
        centre = (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1) * radius * 0.6
        volume += torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma**2))
    box_A = grid.box_px * grid.pixel_A
    x_ft = low_pass_ft(map_to_ft(volume * mask.double().cpu()), n, box_A / n, settings.start_res_A)
    x_ft = x_ft.to(device, torch.promote_types(dtype, torch.complex64))
    table = inputs.table
    sample = np.arange(min(len(table), 1000))
    batch = replace(make_batch(table, sample, None, dtype, device), images_ft=store.images(sample))
    model = ForwardModel(grid, "trilinear")
    power, counts = residual_power(LeastSquares(model, 0.0), torch.zeros_like(x_ft), batch, len(table.optics))
    sigma2 = spectra(power, counts, [g.name for g in table.optics])
    k = settings.top_k
    empty = PoseTable(torch.eye(3, dtype=dtype, device=device).expand(len(table), k, 3, 3).clone(),
                      torch.zeros(len(table), k, 2, dtype=dtype, device=device),
                      torch.zeros(len(table), k, dtype=dtype, device=device),
                      torch.zeros(len(table), k, dtype=dtype, device=device),
                      torch.full((len(table),), math.inf, dtype=dtype, device=device))
    return AbInitioState(0, x_ft, _optimizer(settings).init(x_ft), sigma2, empty)


def _optimizer(settings: AbInitioSettings) -> Chain:
    return chain(ScaleByRunningDiagonal(beta=0.5, power=1), Scale(settings.learning_rate))


def _step(inputs: AbInitioInput, settings: AbInitioSettings, schedule: _Schedule, store: ParticleStore, mask: Tensor,
          state: AbInitioState, index: np.ndarray, t: int):
    """One minibatch: search, weights, a preconditioned step, then the real-space constraints."""
    grid, dtype, device = inputs.grid, state.x.real.dtype, state.x.device
    band = schedule.band_px(t)
    batch = replace(make_batch(inputs.table, index, None, dtype, device), images_ft=store.images(index))
    reference = state.x  # already constrained to the sphere
    images = BandImages.of(batch, grid, band, state.sigma2)
    order = 1 if band <= 8 else 2
    rotations = uniform_rotations(order, device, dtype).matrices
    radius_A = settings.max_shift_A or 2 * grid.work_pixel_A
    shifts = shift_grid(radius_A, grid.work_pixel_A, dtype=dtype, device=device)
    found = global_search(reference, images, rotations, shifts, top_k=settings.top_k, scale_profiled=True)
    share = schedule.best_share(t, settings.top_k)
    temperature = _temperature(found.log_likelihood.double(), share)
    weight = posterior_weights(found.log_likelihood.double(), temperature, particle_ids=torch.as_tensor(index))
    rows = _on_band(weighted_rows(batch, found, weight, torch.eye(3, dtype=dtype, device=device)[None]).batch(),
                    grid, band)
    band_grid = FourierGrid.create(grid.box_px, grid.pixel_A, grid.work_box_px, radius_px=band)
    objective = LeastSquares(ForwardModel(band_grid, "trilinear"), 1e-8, noise_weight(state.sigma2, band_grid))
    optimizer = _optimizer(settings)
    step, loss, _ = minibatch_step(objective, rows, state.x, None, t == 0, optimizer.wants_diagonal)
    update, opt_state, info = optimizer.update(step.gradient, state.optimizer, step)
    x = _constrain(state.x + update, mask, grid, band)
    poses = _record(state.poses, index, found, weight)
    row = {"step": t + 1, "band_px": band, "band_A": grid.box_px * grid.pixel_A / band, "batch": len(index),
           "rotations": int(rotations.shape[0]), "temperature": temperature,
           "best_probability": float(weight[:, 0].mean()), "loss": loss, "step_size": info["step_size"]}
    return AbInitioState(t + 1, x, opt_state, state.sigma2, poses), row


def _final_search(inputs: AbInitioInput, settings: AbInitioSettings, store: ParticleStore, mask: Tensor,
                  state: AbInitioState, schedule: _Schedule) -> AbInitioState:
    """Every particle searched against the last SGD map on the final band (global, 15°, then two
    levels of local refinement of the 4 best); then ``_LOCAL_PASSES`` times, on the working box's
    whole band, local refinement of the two best poses against the one-pass map of the last
    ones. The map kept is the one-pass map of the final poses."""
    band = schedule.band_px(schedule.steps - 1)
    poses, terms = _search_pass(inputs, settings, store, state, masked_ft(state.x, mask), band, None)
    for _ in range(_LOCAL_PASSES):
        reference = masked_ft(_wiener_map(terms), mask)
        poses, terms = _search_pass(inputs, settings, store, state, reference, inputs.grid.work_box_px / 2 - 1, poses)
    return replace(state, step=state.step + 1, x=masked_ft(_wiener_map(terms), mask), poses=poses)


def _search_pass(inputs: AbInitioInput, settings: AbInitioSettings, store: ParticleStore, state: AbInitioState,
                 reference: Tensor, band: float, previous: PoseTable | None) -> tuple[PoseTable, list]:
    """One pass over the particles, 500 at a time: a global search (``previous`` None) or local
    refinement of the ``previous`` poses; then the rows' back-projection b and density H·1, for
    odd and even particles apart."""
    grid, dtype, device = inputs.grid, state.x.real.dtype, state.x.device
    objective = LeastSquares(ForwardModel(grid, "trilinear"), 0.0, noise_weight(state.sigma2, grid))
    rotations = uniform_rotations(2, device, dtype).matrices
    shifts = shift_grid(settings.max_shift_A or 2 * grid.work_pixel_A, grid.work_pixel_A, dtype=dtype, device=device)
    identity = torch.eye(3, dtype=dtype, device=device)[None]
    poses, sums = state.poses, [None, None]
    for chunk in np.array_split(np.arange(len(inputs.table)), max(1, len(inputs.table) // 500)):
        for parity in (0, 1):
            index = chunk[chunk % 2 == parity]
            batch = replace(make_batch(inputs.table, index, None, dtype, device), images_ft=store.images(index))
            images = BandImages.of(batch, grid, band, state.sigma2)
            rows = torch.as_tensor(index, device=device)
            if previous is None:
                start, step_deg = global_search(reference, images, rotations, shifts, top_k=4, scale_profiled=True), 7.5
            else:
                start, step_deg = previous.candidates(rows, 2), 3.75  # the two best
            found, _ = local_search(reference, images, start, step_deg=step_deg, step_A=grid.work_pixel_A / 2,
                                    levels=2)
            found, _ = found.best_first()
            weight = posterior_weights(found.log_likelihood.double(), particle_ids=rows)
            poses = _record(poses, index, found, weight)
            terms = objective.data_terms(weighted_rows(batch, found, weight, identity), diagonal=False)
            sums[parity] = (terms.b, terms.density) if sums[parity] is None else \
                (sums[parity][0] + terms.b, sums[parity][1] + terms.density)
    return poses, sums


def _wiener_map(halves: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The one-pass map of both halves' ``(b, H·1)``, (b₁ + b₂) / (H·1₁ + H·1₂ + w̄/SSNR), with w̄
    the shell mean of the density and SSNR = FSC/(1 − FSC) of the halves' own one-pass maps
    (RELION's τ² prior; the halves share a map's history, so the FSC errs high)."""
    (b1, density1), (b2, density2) = halves
    density = density1 + density2
    floor = 1e-6 * float(density.mean())
    ssnr = ssnr_between(b1 / (density1 + floor), b2 / (density2 + floor))
    shell_weight = shell_means(density)
    per_voxel = (shell_weight / ssnr_per_shell(ssnr, len(shell_weight)))[shell_index(density.shape[0], density.device)]
    ridge = per_voxel.to(density.dtype)
    return (b1 + b2) / (density + ridge + floor)


def _temperature(log_likelihood: Tensor, share: float) -> float:
    """The temperature at which the best pose holds, on average over the minibatch, ``share`` of
    the weight over the kept poses (bisection in log τ)."""
    low, high = -8.0, 12.0
    centred = log_likelihood - log_likelihood[:, :1]
    for _ in range(40):
        mid = 0.5 * (low + high)
        best = torch.softmax(centred / math.exp(mid), dim=1)[:, 0].mean()
        low, high = (mid, high) if best > share else (low, mid)
    return math.exp(0.5 * (low + high))


def _on_band(rows: Batch, grid: FourierGrid, band: float) -> Batch:
    """The rows' images restricted to the band's frequencies (the order of a grid of that radius)."""
    keep = band_mask(grid.freq_px, band).to(rows.images_ft.device)
    return replace(rows, images_ft=rows.images_ft[:, keep])


def _constrain(x: Tensor, mask: Tensor, grid: FourierGrid, band: float) -> Tensor:
    """Inside the soft sphere, no negative density, centred on its centre of mass, within the band."""
    n = grid.work_box_px
    volume = (ft_to_map(x, n) * mask).clamp(min=0)
    x = shift_ft(map_to_ft(volume).to(x.dtype), -centre_of_mass_px(volume))
    return low_pass_ft(x, n, grid.work_pixel_A, grid.box_px * grid.pixel_A / band, edge_shells=2)


def _record(poses: PoseTable, index: np.ndarray, found, weight: Tensor) -> PoseTable:
    """The table with the minibatch's poses in its rows ``index``."""
    rows = torch.as_tensor(index, device=poses.weight.device)
    k = weight.shape[1]
    fields = [t.clone() for t in (poses.rotations, poses.shift_A, poses.log_likelihood, poses.weight)]
    for target, value in zip(fields, (found.rotations, found.shift_A, found.log_likelihood, weight)):
        target[rows, :k] = value.to(target.dtype)
    return PoseTable(*fields, poses.sigma_deg)


def _line(block: list[dict], steps: int) -> str:
    """A progress line for the metrics rows of a block of steps: the last one's numbers and the
    block's time."""
    row, seconds = block[-1], sum(r["seconds"] for r in block)
    return (f"steps {block[0]['step']}–{row['step']}/{steps}: band {row['band_A']:.1f} Å, {row['batch']} images × "
            f"{row['rotations']} rotations, best pose {100 * row['best_probability']:.0f} % of the weight, loss "
            f"{row['loss']:.6g}, {seconds:.1f} s")


def _save(out_dir: Path, identity: dict, state: AbInitioState, metrics: list[dict]) -> None:
    if dist.is_main():
        save_checkpoint(out_dir / "checkpoint.pt", {"identity": identity, "state": state, "metrics": metrics})
        write_lines(out_dir / "metrics.jsonl", [json.dumps(m) for m in metrics])


def _load(out_dir: Path, identity: dict, device) -> tuple[AbInitioState, list[dict]]:
    saved = load_resumable(out_dir / "checkpoint.pt", identity, [AbInitioState, PoseTable, RunningDiagonalState],
                           device)
    return saved["state"], saved["metrics"]


def flip_hand(volume: np.ndarray) -> np.ndarray:
    """The mirror image of a ``[z, y, x]`` map through its centre plane z = n // 2."""
    return np.roll(volume[::-1], 1 if volume.shape[0] % 2 == 0 else 0, axis=0)


def _write_outputs(out_dir: Path, inputs: AbInitioInput, settings: AbInitioSettings, state: AbInitioState) -> None:
    """initial.mrc at the particles' box and pixel size, and particles.star with the poses."""
    if not dist.is_main():
        return
    grid = inputs.grid
    coarse = torch.as_tensor(map_of(state.x, grid, "trilinear"), dtype=torch.float64)
    volume = ft_to_map(pad_ft(map_to_ft(coarse), grid.box_px), grid.box_px).numpy().astype(np.float32)
    if settings.flip_hand:
        volume = flip_hand(volume)
    write_map(out_dir / "initial.mrc", volume, grid.pixel_A)
    poses = state.poses
    rotations = poses.rotations[:, 0]
    if settings.flip_hand:
        mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=rotations.dtype, device=rotations.device))
        rotations = mirror @ rotations @ mirror
    table = replace(inputs.table, angles_deg=matrix_to_euler(rotations.double().cpu()).numpy(),
                    shift_A=poses.shift_A[:, 0].double().cpu().numpy(),
                    extra={**inputs.table.extra, "rlnMaxValueProbDistribution":
                           [f"{v:.6f}" for v in poses.weight[:, 0].double().cpu().numpy()]})
    write_particles(out_dir / "particles.star", table)
