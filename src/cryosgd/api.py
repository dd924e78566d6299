"""The Python API: what each ``cryosgd`` command does, as one function (the CLI calls these).

Each function checks its output paths before any work starts (:mod:`cryosgd.io.outputs`),
holds its output folder's lock while it writes, and raises :class:`~cryosgd.errors.InputError`
with a one-line message on bad input.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from cryosgd import dist
from cryosgd.analysis.conditioning import HessianReport, HessianSettings, analyse
from cryosgd.analysis.postprocess import PostprocessResult, bfactor_words
from cryosgd.analysis.postprocess import postprocess as run_postprocess
from cryosgd.data.particles import read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.errors import InputError
from cryosgd.fourier.fsc import FSCCurve, fsc as fsc_of_maps
from cryosgd.io.atomic import atomic_path, write_lines
from cryosgd.io.mrc import check_voxel_size, read_map, write_map
from cryosgd.io.outputs import OutputFolder, check_new_files
from cryosgd.pose.symmetry import symmetry_group
from cryosgd.recon.ab_initio import OUTPUTS as ABINITIO_OUTPUTS
from cryosgd.recon.ab_initio import HAND, AbInitioInput, AbInitioResult, flip_hand
from cryosgd.recon.ab_initio import ab_initio as run_ab_initio
from cryosgd.recon.reconstruct import OUTPUTS, ReconstructionInput, ReconstructionResult
from cryosgd.recon.reconstruct import reconstruct as run_reconstruction
from cryosgd.recon.refine import OUTPUTS as REFINE_OUTPUTS
from cryosgd.recon.refine import RefineInput, RefineResult, min_join_res_A
from cryosgd.recon.refine import refine as run_refinement
from cryosgd.recon.settings import AbInitioSettings, ReconstructionSettings, RefineSettings
from cryosgd.report import (Progress, plural, save_abinitio_plot, save_fsc_plot, save_montage, save_progress_plot,
                            save_refinement_plot, save_sections)
from cryosgd.resources import resolve_device
from cryosgd.sim.project import project
from cryosgd.sim.simulate import SimulationSettings, simulate

__all__ = ["AutoResult", "DemoResult", "abinitio", "auto", "demo", "flip", "fsc", "hessian", "postprocess", "project", "reconstruct", "refine",
           "simulate"]

PLOTS = ("fsc.png", "progress.png")


def _device(name: str | None):
    """``--device`` resolved, the process group joined when torchrun started us, and the GPU of
    this process's local rank."""
    device = dist.local_device(resolve_device(name))
    dist.init(device)
    return device


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


def refine(star: str | Path, reference: str | Path, out_dir: str | Path,
           settings: RefineSettings = RefineSettings(), *, mask: str | Path | None = None, resume: bool = False,
           force: bool = False, device: str | None = None, pixel_A: float | None = None,
           show_progress: bool = True) -> RefineResult:
    """``cryosgd refine``: gold-standard refinement with unknown poses from a reference
    (half maps, map, FSC per iteration, refined particles.star, plots, checkpoints;
    docs/refinement.md)."""
    torch_device = _device(device)
    inputs = RefineInput.read(star, reference, settings, mask, pixel_A)
    with OutputFolder(out_dir, "refine", REFINE_FILES, inputs.files, force, writer=dist.is_main()):
        with Progress("refining", enabled=show_progress and dist.is_main()) as progress:
            return _refine(inputs, Path(out_dir), settings, resume, torch_device, progress)


REFINE_FILES = REFINE_OUTPUTS + ("fsc.png", "refinement.png")


def _refine(inputs, out_dir: Path, settings, resume, device, progress) -> RefineResult:
    result = run_refinement(inputs, out_dir, settings, resume=resume, device=device, progress=progress)
    if dist.is_main():
        save_fsc_plot(out_dir / "fsc.png", {"half maps": (result.fsc, 0.143)}, "half-map FSC")
        save_refinement_plot(out_dir / "refinement.png", result.metrics)
    return result


def abinitio(star: str | Path, out_dir: str | Path, settings: AbInitioSettings = AbInitioSettings(), *,
             resume: bool = False, force: bool = False, device: str | None = None, pixel_A: float | None = None,
             show_progress: bool = True) -> AbInitioResult:
    """``cryosgd abinitio``: an initial map and poses from particles alone (docs/abinitio.md)."""
    torch_device = _device(device)
    inputs = AbInitioInput.read(star, settings, pixel_A)
    with OutputFolder(out_dir, "abinitio", ABINITIO_FILES, inputs.files, force, writer=dist.is_main()):
        with Progress("ab initio", enabled=show_progress and dist.is_main()) as progress:
            return _abinitio(inputs, Path(out_dir), settings, resume, torch_device, progress)


ABINITIO_FILES = ABINITIO_OUTPUTS + ("sections.png", "abinitio.png")


def _abinitio(inputs, out_dir: Path, settings, resume, device, progress) -> AbInitioResult:
    result = run_ab_initio(inputs, out_dir, settings, resume=resume, device=device, progress=progress)
    if dist.is_main():
        volume, _ = read_map(out_dir / "initial.mrc")
        save_sections(out_dir / "sections.png", volume, "initial map: central sections")
        save_abinitio_plot(out_dir / "abinitio.png", result.metrics)
    return result


def postprocess(half1: str | Path, half2: str | Path, out_dir: str | Path, *, mask: str | Path | None = None,
                lowpass_A: float = 15.0, autob_lowres_A: float = 10.0, force: bool = False) -> PostprocessResult:
    """``cryosgd postprocess``: mask, corrected FSC, B-factor and sharpened map, as relion_postprocess."""
    with OutputFolder(out_dir, "postprocess", POSTPROCESS_FILES, [half1, half2, mask], force):
        return run_postprocess(half1, half2, out_dir, mask, lowpass_A=lowpass_A, autob_lowres_A=autob_lowres_A)


POSTPROCESS_FILES = ("mask.mrc", "map_sharpened.mrc", "map_sharpened_masked.mrc", "fsc.csv", "fsc.png", "guinier.csv",
                     "guinier.png")


@dataclass(frozen=True)
class AutoResult:
    out_dir: Path
    resolution_A: float
    bfactor_A2: float
    stages: dict  # per stage: seconds (and the post-processing's numbers)

    @property
    def summary(self) -> str:
        return (f"resolution {self.resolution_A:.2f} Å ({_fsc_source(self.stages)}), {_bfactor(self.stages)}; "
                f"sharpened map: {self.out_dir / 'map_sharpened.mrc'}; report: {self.out_dir / 'report.md'}")


def _fsc_source(stages: dict) -> str:
    """Which FSC the post-processing stage read the resolution from (``auto.json``)."""
    return stages["postprocess"].get("fsc_source", "FSC 0.143")


def _bfactor(stages: dict) -> str:
    """The post-processing stage's B-factor in words (``auto.json``; older ones lack ``fit_shells``)."""
    return bfactor_words(stages["postprocess"]["bfactor_A2"], stages["postprocess"].get("fit_shells"))


AUTO_FILES = ("map_sharpened.mrc", "particles.star", "report.md", "sections.png", "auto.json")


def auto(star: str | Path, out_dir: str | Path, *, particle_diameter_A: float | None = None, sym: str = "C1",
         max_iter: int = 20, seed: int = 0, resume: bool = False, force: bool = False, device: str | None = None,
         pixel_A: float | None = None, show_progress: bool = True) -> AutoResult:
    """``cryosgd auto``: ab initio → refinement → post-processing, each stage in a subfolder of
    ``out_dir``; a resumed run continues at the stage (and step) where it stopped."""
    torch_device = _device(device)
    out = Path(out_dir)
    abinitio_settings = AbInitioSettings(particle_diameter_A=particle_diameter_A, seed=seed)
    first = AbInitioInput.read(star, abinitio_settings, pixel_A)
    join_res_A = max(RefineSettings.join_res_A, min_join_res_A(first.table.pixel_A))  # coarse data: coarser
    refine_settings = RefineSettings(particle_diameter_A=particle_diameter_A, sym=sym, max_iter=max_iter, seed=seed,
                                     join_res_A=join_res_A)
    symmetry_group(sym)  # an unknown group stops here, before any work
    with OutputFolder(out, "auto", AUTO_FILES, first.files, force, writer=dist.is_main()):
        done = _auto_log(out) if resume else {}
        with Progress("auto", enabled=show_progress and dist.is_main()) as progress:
            def ab_initio_stage(again: bool) -> dict:
                _abinitio(first, out / "abinitio", abinitio_settings, again, torch_device, progress)
                return {}

            def refine_stage(again: bool) -> dict:
                inputs = RefineInput.read(star, out / "abinitio" / "initial.mrc", refine_settings, pixel_A=pixel_A)
                result = _refine(inputs, out / "refine", refine_settings, again, torch_device, progress)
                return {"half_map_resolution_A": result.resolution_A, "iterations": len(result.metrics)}

            def postprocess_stage(again: bool) -> dict:
                halves = (out / "refine" / "half1.mrc", out / "refine" / "half2.mrc")
                result = run_postprocess(*halves, out / "postprocess")
                progress.line(result.summary)
                return {"resolution_A": result.resolution_A, "bfactor_A2": result.bfactor_A2,
                        "fit_shells": result.fit_shells, "fsc_source": result.fsc_source}

            for name, run, files in (("abinitio", ab_initio_stage, ABINITIO_FILES),
                                     ("refine", refine_stage, REFINE_FILES),
                                     ("postprocess", postprocess_stage, POSTPROCESS_FILES)):
                done = _auto_stage(out, done, name, run, files, first.files, resume)
        if dist.is_main():
            _auto_outputs(out, star, done)
    return AutoResult(out, done["postprocess"]["resolution_A"], done["postprocess"]["bfactor_A2"], done)


def _auto_log(out: Path) -> dict:
    """``auto.json``: the stages done, their seconds and results."""
    try:
        return json.loads((out / "auto.json").read_text())
    except (OSError, ValueError):
        return {}


def _auto_stage(out: Path, done: dict, name: str, run, files: tuple[str, ...], inputs, resume: bool) -> dict:
    """Run one stage into ``out/name`` unless ``done`` says it finished; with ``resume``, a
    stage interrupted after its first checkpoint continues from it."""
    if name in done:
        return done
    folder = out / name
    again = resume and (folder / "checkpoint.pt").exists()
    start = time.perf_counter()
    with OutputFolder(folder, name, files, inputs, force=True, writer=dist.is_main()):
        extra = run(again)
    done = {**done, name: {"seconds": time.perf_counter() - start, **extra}}
    if dist.is_main():
        write_lines(out / "auto.json", [json.dumps(done, indent=1)])
    return done


def _auto_outputs(out: Path, star: str | Path, done: dict) -> None:
    """The sharpened map and the refined particles at the top, its central sections, report.md."""
    volume, voxel_A = read_map(out / "postprocess" / "map_sharpened.mrc")
    write_map(out / "map_sharpened.mrc", volume, voxel_A)
    with atomic_path(out / "particles.star") as tmp:
        tmp.write_bytes((out / "refine" / "particles.star").read_bytes())
    save_sections(out / "sections.png", volume, "sharpened map: central sections")
    pp, refine = done["postprocess"], done["refine"]
    total = sum(stage["seconds"] for stage in done.values())
    lines = [f"# cryosgd auto: {star}", "",
             f"**Resolution {pp['resolution_A']:.2f} Å** ({_fsc_source(done)}), {_bfactor(done)}, "
             f"after {plural(refine['iterations'], 'refinement iteration')} (half maps "
             f"{refine['half_map_resolution_A']:.2f} Å "
             f"unmasked). Sharpened map: `map_sharpened.mrc`; refined poses: `particles.star`.", "",
             f"The hand: {HAND}.", "", "| stage | folder | seconds |", "|---|---|---|"]
    lines += [f"| {name} | `{name}/` | {stage['seconds']:.0f} |" for name, stage in done.items()]
    lines += [f"| total | | {total:.0f} |", "", "## The map", "", "![central sections](sections.png)", "",
              "![FSC](postprocess/fsc.png) ![Guinier plot](postprocess/guinier.png)", "",
              "## How it got there", "", "![ab initio map](abinitio/sections.png) ![ab initio](abinitio/abinitio.png)",
              "", "![refinement](refine/refinement.png) ![half-map FSC](refine/fsc.png)"]
    write_lines(out / "report.md", lines)


def flip(map_path: str | Path, output: str | Path, *, force: bool = False) -> Path:
    """``cryosgd flip``: the mirror image of a map (the other hand), with its voxel size."""
    volume, voxel_A = read_map(map_path)
    check_new_files([Path(output)], [map_path], force)
    write_map(output, flip_hand(volume), voxel_A)
    return Path(output)


def fsc(map_a: str | Path, map_b: str | Path, mask: str | Path | None = None) -> FSCCurve:
    """``cryosgd fsc``: FSC of two maps of the same box and voxel size, optionally masked."""
    a, pixel_a = read_map(map_a)
    b, pixel_b = read_map(map_b)
    m, pixel_m = (None, 0.0) if mask is None else read_map(mask, need_voxel_size=False)
    for path, other, pixel in ((map_b, b, pixel_b), (mask, m, pixel_m)):
        if other is None:
            continue
        if other.shape != a.shape:
            raise InputError(path, f"shape {other.shape} differs from {map_a} {a.shape}")
        check_voxel_size(path, pixel, pixel_a, f"{map_a}'s")
    if a.shape[0] < 4:
        raise InputError(map_a, f"a box of {a.shape[0]} voxels: too small for an FSC (at least 4)")
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
