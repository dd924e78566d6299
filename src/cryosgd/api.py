"""The Python API: what each ``cryosgd`` command does, as one function (the CLI calls these).

Each function checks its output paths before any work starts (:mod:`cryosgd.io.outputs`),
holds its output folder's lock while it writes, and raises :class:`~cryosgd.errors.InputError`
with a one-line message on bad input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from cryosgd import dist
from cryosgd.analysis.conditioning import HessianReport, HessianSettings, analyse
from cryosgd.data.particles import read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.errors import InputError
from cryosgd.fourier.fsc import FSCCurve, fsc as fsc_of_maps
from cryosgd.io.mrc import read_map
from cryosgd.io.outputs import OutputFolder
from cryosgd.recon.reconstruct import OUTPUTS, ReconstructionInput, ReconstructionResult
from cryosgd.recon.reconstruct import reconstruct as run_reconstruction
from cryosgd.recon.settings import ReconstructionSettings
from cryosgd.report import Progress, save_fsc_plot, save_montage, save_progress_plot
from cryosgd.resources import resolve_device
from cryosgd.sim.project import project
from cryosgd.sim.simulate import SimulationSettings, simulate

__all__ = ["DemoResult", "demo", "fsc", "hessian", "project", "reconstruct", "simulate"]

PLOTS = ("fsc.png", "progress.png")


def _device(name: str | None):
    """``--device`` resolved, the process group joined when torchrun started us, and the GPU of
    this process's local rank."""
    device = resolve_device(name)
    dist.init(device)
    return dist.local_device(device)


def reconstruct(star: str | Path, out_dir: str | Path, settings: ReconstructionSettings = ReconstructionSettings(),
                *, resume: bool = False, force: bool = False, device: str | None = None,
                pixel_A: float | None = None, show_progress: bool = True) -> ReconstructionResult:
    """``cryosgd reconstruct``: gold-standard known-pose reconstruction into ``out_dir``
    (maps, FSC, metrics, plots, checkpoints; docs/reconstruction.md)."""
    torch_device = _device(device)
    inputs = ReconstructionInput.read(star, settings, pixel_A)
    with OutputFolder(out_dir, "reconstruct", OUTPUTS + PLOTS, inputs.files(), force, writer=dist.is_main()):
        return _reconstruct(inputs, Path(out_dir), settings, resume, torch_device, show_progress)


def _reconstruct(inputs, out_dir: Path, settings, resume, device, show_progress) -> ReconstructionResult:
    with Progress("reconstructing", enabled=show_progress and dist.is_main()) as progress:
        result = run_reconstruction(inputs, out_dir, settings, resume=resume, device=device, progress=progress)
    if dist.is_main():
        save_fsc_plot(out_dir / "fsc.png", {"half maps": (result.fsc, 0.143)}, "half-map FSC")
        save_progress_plot(out_dir / "progress.png", result.metrics)
    return result


def fsc(map_a: str | Path, map_b: str | Path, mask: str | Path | None = None) -> FSCCurve:
    """``cryosgd fsc``: FSC of two maps of the same box and voxel size, optionally masked."""
    a, pixel_a = read_map(map_a)
    b, pixel_b = read_map(map_b)
    m = None if mask is None else read_map(mask, need_voxel_size=False)[0]
    for path, other in ((map_b, b), (mask, m)):
        if other is not None and other.shape != a.shape:
            raise InputError(path, f"shape {other.shape} differs from {map_a} {a.shape}")
    if abs(pixel_a - pixel_b) > 1e-3 * pixel_a:
        raise InputError(map_b, f"voxel size {pixel_b:g} Å differs from {map_a} ({pixel_a:g} Å)")
    for path, volume in ((map_a, a), (map_b, b), (mask, m)):
        if volume is not None and not np.any(volume):
            raise InputError(path, "all zero: no FSC can be computed")
    if m is not None and not (np.any(a * m) and np.any(b * m)):
        raise InputError(mask, "the mask removes everything of the maps")
    return fsc_of_maps(a, b, pixel_a, m)


def hessian(star: str | Path, out_dir: str | Path, settings: HessianSettings = HessianSettings(), *,
            force: bool = False, pixel_A: float | None = None, device: str | None = None) -> HessianReport:
    """``cryosgd hessian``: the Hessian diagonal, its radial profile and κ(R) (docs/reproduction.md)."""
    torch_device = resolve_device(device)
    outputs = ("hessian_diagonal.mrc", "radial_profile.csv", "radial_profile.png", "kappa.csv", "kappa.png")
    with OutputFolder(out_dir, "hessian", outputs, [star], force):
        return analyse(star, out_dir, settings, pixel_A=pixel_A, device=torch_device)


@dataclass(frozen=True)
class DemoResult:
    reconstruction: ReconstructionResult
    against_truth: FSCCurve
    star: Path
    seconds: float


def demo(out_dir: str | Path = "cryosgd-demo", n_particles: int = 6000, seed: int = 0, *, force: bool = False,
         device: str | None = None, show_progress: bool = True, on_simulated=lambda star: None) -> DemoResult:
    """``cryosgd demo``: simulate particles of ubiquitin (PDB 1UBQ, shipped; box 64, 1.5 Å, SNR
    0.01, B 60 Å²) and reconstruct them with known poses; also the FSC against the ground truth."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    torch_device = _device(device)
    outputs = OUTPUTS + PLOTS + ("particles.png", "fsc_truth.png")
    with OutputFolder(out_dir, "demo", outputs, (), force, writer=dist.is_main()):
        model = resources.files("cryosgd") / "data" / "1ubq.pdb"
        with resources.as_file(model) as pdb:
            settings = SimulationSettings(n_particles=n_particles, snr=0.01, defocus_min_A=5000.0,
                                          defocus_max_A=15000.0, bfactor_A2=60.0, seed=seed)
            star = simulate(pdb, out_dir / "data", settings, box_px=64, pixel_A=1.5, force=force)
        on_simulated(star)
        images = ImageStack(read_particles(star)).read(np.arange(6))
        save_montage(out_dir / "particles.png", {"simulated particles": images})
        settings = ReconstructionSettings(seed=seed)
        result = _reconstruct(ReconstructionInput.read(star, settings), out_dir, settings, False, torch_device,
                              show_progress)
        truth, pixel_A = read_map(out_dir / "data" / "ground_truth.mrc")
        against_truth = fsc_of_maps(read_map(out_dir / "map.mrc")[0], truth, pixel_A)
        save_fsc_plot(out_dir / "fsc_truth.png", {"half maps": (result.fsc, 0.143),
                                                  "map vs ground truth": (against_truth, 0.5)}, "FSC")
    return DemoResult(result, against_truth, star, time.perf_counter() - start)
