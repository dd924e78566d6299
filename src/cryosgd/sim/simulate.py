"""Simulated particle datasets with a known ground truth.

A map (MRC, or an atomic model rendered with electron scattering factors through
gemmi) is projected at uniform or given orientations with random shifts, astigmatic
CTFs drawn from a defocus range, and white Gaussian noise at a target SNR
(variance of the noise-free images over the noise variance, over whole boxes).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np

from cryosgd.data.particles import OpticsGroup, ParticleTable, read_particles, write_particles
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid
from cryosgd.io.mrc import new_stack, read_map, write_map
from cryosgd.io.outputs import OutputFolder
from cryosgd.resources import available_memory_bytes
from cryosgd.sim.project import project_into


def model_to_map(path: str | Path, box_px: int, pixel_A: float) -> np.ndarray:
    """Render an atomic model (PDB/mmCIF) as a ``[z, y, x]`` electron-potential map.

    The model's centre of mass is placed at voxel ``box // 2``; the map is band-limited
    to ``2 · pixel_A`` (gemmi's ``DensityCalculatorE``, Peng's electron form factors).
    """
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as err:
        raise InputError(path, f"cannot read atomic model ({err})") from None
    structure.remove_hydrogens()
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        raise InputError(path, "atomic model has no atoms")
    model = structure[0]
    centre = model.calculate_center_of_mass()
    half = box_px // 2 * pixel_A
    offset = gemmi.Position(half - centre.x, half - centre.y, half - centre.z)
    for chain in model:
        for residue in chain:
            for atom in residue:
                atom.pos = atom.pos + offset
    calc = gemmi.DensityCalculatorE()
    calc.d_min = 2 * pixel_A
    calc.grid.set_unit_cell(gemmi.UnitCell(*(box_px * pixel_A,) * 3, 90, 90, 90))
    calc.grid.set_size(box_px, box_px, box_px)
    calc.grid.fill(0)
    calc.add_model_density_to_grid(model)
    calc.grid.symmetrize_sum()
    return np.array(calc.grid, copy=True).transpose(2, 1, 0).astype(np.float32)


def load_map(path: str | Path, box_px: int | None, pixel_A: float | None) -> tuple[np.ndarray, float]:
    """A map from an MRC file (its own box and voxel size) or an atomic model (given ones)."""
    path = Path(path)
    if path.suffix.lower() in {".mrc", ".map", ".mrcs"}:
        if box_px is not None or pixel_A is not None:
            raise InputError(path, "--box and --pixel-size are for atomic models: a map has its own box and voxel size")
        volume, voxel_A = read_map(path)
        if not np.any(volume):
            raise InputError(path, "the map is all zero: its projections would hold no signal")
        return volume, voxel_A
    if not path.is_file():
        raise InputError(path, "file not found")
    if box_px is None or pixel_A is None:
        raise InputError(path, "an atomic model needs --box and --pixel-size")
    if not pixel_A > 0:
        raise InputError(None, f"--pixel-size {pixel_A}: must be positive")
    FourierGrid.create(box_px, pixel_A, source="--box")
    return model_to_map(path, box_px, pixel_A), pixel_A


@dataclass(frozen=True)
class SimulationSettings:
    """Everything random about a simulated dataset, with typical single-particle values."""

    n_particles: int = 1000
    snr: float = 0.1
    shift_sigma_A: float = 3.0
    defocus_min_A: float = 8000.0
    defocus_max_A: float = 25000.0
    astigmatism_max_A: float = 1000.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_A2: float = 0.0  # envelope exp(−B s²/4) applied to the ground truth itself
    seed: int = 0

    def __post_init__(self):
        checks = [("-n", self.n_particles, self.n_particles >= 1, "must be at least 1"),
                  ("--snr", self.snr, self.snr > 0, "must be positive"),
                  ("--shift-sigma", self.shift_sigma_A, self.shift_sigma_A >= 0, "must be ≥ 0"),
                  ("--defocus-min", self.defocus_min_A, self.defocus_min_A > 0, "must be positive (underfocus, Å)"),
                  ("--defocus-max", self.defocus_max_A, self.defocus_max_A >= self.defocus_min_A,
                   f"must be ≥ --defocus-min {self.defocus_min_A}"),
                  ("--astigmatism", self.astigmatism_max_A, 0 <= self.astigmatism_max_A < 2 * self.defocus_min_A,
                   "must be ≥ 0 and below twice --defocus-min"),
                  ("--bfactor", self.bfactor_A2, self.bfactor_A2 >= 0, "must be ≥ 0"),
                  ("voltage", self.voltage_kV, self.voltage_kV > 0, "must be positive"),
                  ("amplitude contrast", self.amplitude_contrast, 0 <= self.amplitude_contrast < 1, "must be in [0, 1)"),
                  ("--seed", self.seed, self.seed >= 0, "must be ≥ 0")]
        for option, value, ok, rule in checks:
            if not ok:
                raise InputError(None, f"{option} {value}: {rule}")


def random_table(settings: SimulationSettings, pixel_A: float, box_px: int,
                 poses: ParticleTable | None = None) -> ParticleTable:
    """Poses (uniform on SO(3), or taken from ``poses``), shifts, CTFs and half-sets."""
    rng = np.random.default_rng(settings.seed)
    n = settings.n_particles if poses is None else len(poses)
    if poses is not None:
        angles = poses.require_poses()
    else:
        angles = np.stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                           rng.uniform(-180, 180, n)], axis=1)
    mean = rng.uniform(settings.defocus_min_A, settings.defocus_max_A, n)
    half_astig = rng.uniform(0, settings.astigmatism_max_A / 2, n)
    optics = OpticsGroup("opticsGroup1", settings.voltage_kV, settings.cs_mm, settings.amplitude_contrast,
                         pixel_A, box_px)
    return ParticleTable(
        optics=[optics], optics_group=np.zeros(n, dtype=int), angles_deg=angles,
        shift_A=rng.normal(0, settings.shift_sigma_A, (n, 2)),
        defocus_u_A=mean + half_astig, defocus_v_A=mean - half_astig, defocus_angle_deg=rng.uniform(0, 180, n),
        phase_shift_deg=np.zeros(n), bfactor_A2=np.zeros(n), ctf_scale=np.ones(n),
        random_subset=rng.permutation(np.arange(n) % 2 + 1))


def simulate(source: str | Path, out_dir: str | Path, settings: SimulationSettings = SimulationSettings(), *,
             box_px: int | None = None, pixel_A: float | None = None, poses_star: str | Path | None = None,
             batch_size: int = 256, device: str | None = None, force: bool = False) -> Path:
    """Write ``particles.star`` (3.1), ``particles.mrcs`` and ``ground_truth.mrc`` to ``out_dir``.

    The folder is checked (and locked) before anything is computed, and the stack's size
    against the free disk space. Returns the path of the STAR file.
    """
    if batch_size < 1:
        raise InputError(None, f"--batch-size {batch_size}: must be at least 1")
    out_dir = Path(out_dir)
    volume, voxel_A = load_map(source, box_px, pixel_A)
    FourierGrid.create(volume.shape[0], voxel_A, source=source)
    poses = read_particles(poses_star, pixel_A=voxel_A, pixel_source=f"{source}'s voxel size") if poses_star else None
    if settings.bfactor_A2:
        volume = blur(volume, voxel_A, settings.bfactor_A2)
        if not (np.isfinite(volume).all() and np.any(volume)):
            raise InputError(None, f"--bfactor {settings.bfactor_A2}: leaves no signal in the map")
    with OutputFolder(out_dir, "simulate", OUTPUTS, [source, poses_star], force):
        _check_space(out_dir, settings.n_particles if poses is None else len(poses), volume.shape[0])
        table = random_table(settings, voxel_A, volume.shape[0], poses)
        stack = out_dir / "particles.mrcs"
        with new_stack(stack, len(table), volume.shape[0], voxel_A) as images:
            project_into(images, volume, voxel_A, table, batch_size=batch_size, device=device)
            noise_sigma = np.sqrt(_variance(images, batch_size) / settings.snr)
            rng = np.random.default_rng(settings.seed + 1)
            for start in range(0, len(table), batch_size):
                chunk = images[start:start + batch_size]
                chunk += rng.normal(0, noise_sigma, chunk.shape).astype(np.float32)
        write_map(out_dir / "ground_truth.mrc", volume, voxel_A)
        table.image_name = [f"{i + 1:06d}@{stack.name}" for i in range(len(table))]
        write_particles(out_dir / "particles.star", table)
    return out_dir / "particles.star"


OUTPUTS = ("particles.star", "particles.mrcs", "ground_truth.mrc")


def _check_space(out_dir: Path, n: int, box_px: int) -> None:
    """Refuse before allocating: the stack must fit on the disk, the table in memory."""
    stack_bytes = n * box_px * box_px * 4 + 1024
    free = shutil.disk_usage(out_dir).free
    if stack_bytes > free:
        raise InputError(out_dir, f"-n {n}: the stack needs {stack_bytes / 1e9:.3g} GB, "
                                  f"{free / 1e9:.3g} GB free on this disk")
    table_bytes = n * 400  # the particle table's arrays and STAR text, per particle
    if table_bytes > available_memory_bytes():
        raise InputError(None, f"-n {n}: the particle table needs {table_bytes / 1e9:.3g} GB of memory, "
                               f"{available_memory_bytes() / 1e9:.3g} GB available")


def blur(volume: np.ndarray, voxel_A: float, bfactor_A2: float) -> np.ndarray:
    """Multiply a map's Fourier transform by the envelope exp(−B s²/4)."""
    n = volume.shape[0]
    s = np.fft.fftfreq(n, voxel_A)
    s2 = s[:, None, None] ** 2 + s[None, :, None] ** 2 + np.fft.rfftfreq(n, voxel_A)[None, None, :] ** 2
    blurred = np.fft.irfftn(np.fft.rfftn(volume) * np.exp(-bfactor_A2 * s2 / 4), s=volume.shape)
    return blurred.astype(np.float32)


def _variance(images: np.ndarray, batch_size: int) -> float:
    """Variance of each image about its own mean, averaged over the stack, in batches."""
    total = 0.0
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size].astype(np.float64)
        total += chunk.var(axis=(1, 2)).sum()
    return total / len(images)
