"""The ``cryosgd`` command: a thin layer over :mod:`cryosgd.api` (argparse; nothing heavy is
imported before the arguments are checked, so ``--help`` and mistakes answer at once).

Bad input ends with one line on stderr, ``error: FILE: what is wrong`` (or ``error: argument
--option: …``), and exit code 2; Ctrl-C with one line saying how to continue (exit code 130).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

from cryosgd.errors import InputError
from cryosgd.resources import keep_freed_memory, quiet_openmp


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float | None = None, open_low: bool = False):
    """An argparse type: finite ``kind`` values ≥ ``low`` (> ``low`` when ``open_low``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
        if low is not None and (value < low or (open_low and value == low)):
            raise argparse.ArgumentTypeError(f"{text}: must be {'>' if open_low else '≥'} {low:g}")
        return value
    return parse


def _path(text: str) -> Path:
    """An argparse type: a non-empty path."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return Path(text)


POSITIVE, NON_NEGATIVE = _number(float, 0, open_low=True), _number(float, 0)
COUNT, NATURAL = _number(int, 1), _number(int, 0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cryosgd")
    except PackageNotFoundError:
        return "(not installed)"


def _add_common(p: argparse.ArgumentParser, device: bool = True, force: bool = True) -> None:
    if device:
        p.add_argument("--device", metavar="DEVICE", help="torch device: cpu, cuda, cuda:1, … (default: cpu)")
        p.add_argument("--threads", type=COUNT, metavar="N", help="CPU threads (default: the CPUs this process may use)")
    if force:
        p.add_argument("--force", action="store_true", help="replace existing outputs of another run")


def _interp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interp", choices=("trilinear", "nearest"), default="trilinear",
                   help="Fourier-space interpolation of the slices (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cryosgd", description="Cryo-EM reconstruction by preconditioned stochastic gradient descent.")
    parser.add_argument("--version", action="version", version=f"cryosgd {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    for add in (_project_args, _simulate_args, _reconstruct_args, _refine_args, _abinitio_args, _postprocess_args,
                _auto_args, _flip_args, _fsc_args, _hessian_args, _demo_args):
        add(commands)
    return parser


def _project_args(commands) -> None:
    p = commands.add_parser("project", help="noise-free CTF-modulated projections at a STAR file's poses",
                            description="Noise-free CTF-modulated projections of MAP at the STAR's poses, origins "
                                        "and CTFs (like relion_project --ctf). Writes OUT.mrcs and OUT.star.")
    p.add_argument("map", type=_path, metavar="MAP.mrc", help="real-space map to project")
    p.add_argument("star", type=_path, metavar="PARTICLES.star", help="poses, origins and CTFs (STAR 3.0/3.1)")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="OUT.mrcs",
                   help="new image stack; OUT.star is written beside it")
    _interp(p)
    p.add_argument("--no-ctf", dest="ctf", action="store_false", help="do not apply the CTF")
    p.add_argument("--pad", type=COUNT, default=2, metavar="N", help="Fourier oversampling of the map (default: 2)")
    p.add_argument("--batch-size", type=COUNT, default=256, metavar="N", help="images per batch (default: 256)")
    _add_common(p)
    p.set_defaults(run=_project)


def _simulate_args(commands) -> None:
    p = commands.add_parser("simulate", help="a particle dataset with known ground truth",
                            description="A particle dataset (STAR 3.1 + MRCS + ground_truth.mrc) from a map or an "
                                        "atomic model, with known poses, CTFs and noise.")
    p.add_argument("source", type=_path, metavar="MAP.mrc|MODEL.pdb|MODEL.cif", help="map or atomic model")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="FOLDER", help="output folder")
    p.add_argument("-n", "--particles", type=COUNT, default=1000, metavar="N", help="number of particles (default: 1000)")
    p.add_argument("--snr", type=POSITIVE, default=0.1, help="signal variance / noise variance per image (default: 0.1)")
    p.add_argument("--box", type=COUNT, metavar="PX", help="box (px) for an atomic model")
    p.add_argument("--pixel-size", type=POSITIVE, metavar="Å", help="pixel size (Å) for an atomic model")
    p.add_argument("--poses", type=_path, metavar="STAR", help="take orientations from this STAR file instead of uniform")
    p.add_argument("--shift-sigma", type=NON_NEGATIVE, default=3.0, metavar="Å", help="std of the origins (default: 3 Å)")
    p.add_argument("--defocus-min", type=POSITIVE, default=8000.0, metavar="Å", help="smallest mean defocus (default: 8000 Å)")
    p.add_argument("--defocus-max", type=POSITIVE, default=25000.0, metavar="Å", help="largest mean defocus (default: 25000 Å)")
    p.add_argument("--astigmatism", type=NON_NEGATIVE, default=1000.0, metavar="Å", help="largest defocus U − V (default: 1000 Å)")
    p.add_argument("--bfactor", type=NON_NEGATIVE, default=0.0, metavar="Å²", help="B-factor envelope of the ground truth (default: 0)")
    p.add_argument("--seed", type=NATURAL, default=0, help="random seed (default: 0)")
    _add_common(p)
    p.set_defaults(run=_simulate)


def _reconstruct_args(commands) -> None:
    p = commands.add_parser("reconstruct", help="gold-standard reconstruction with known poses",
                            description="Gold-standard known-pose reconstruction: half maps, map, FSC, metrics, plots, "
                                        "checkpoints (docs/reconstruction.md).")
    p.add_argument("star", type=_path, metavar="PARTICLES.star", help="particles with known poses (STAR 3.0/3.1)")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="FOLDER", help="output folder")
    p.add_argument("--method", choices=("algorithm1", "sgd", "exact-diag", "running-diag", "cg", "pcg"),
                   default="algorithm1",
                   help="algorithm1 (the paper's), sgd, exact-diag (the first pass's diagonal), running-diag (a running "
                        "average of each batch's exact diagonal), cg, or pcg (CG preconditioned by the exact "
                        "diagonal) (default: %(default)s)")
    p.add_argument("--epochs", type=NATURAL, metavar="N",
                   help="passes after the first (CG: iterations); 0 writes the one-pass map (default: while the "
                        "half-map FSC rises, at most --max-epochs)")
    p.add_argument("--max-epochs", type=COUNT, default=10, metavar="N", help="most epochs without --epochs (default: 10)")
    p.add_argument("--batch-size", type=COUNT, default=1000, metavar="N", help="images per step (default: 1000)")
    _interp(p)
    p.add_argument("--box", type=COUNT, metavar="PX", help="working box (px): Fourier-crop the images to it")
    p.add_argument("--l2", type=NON_NEGATIVE, default=1e-8, metavar="λ", help="ridge weight (default: 1e-8)")
    p.add_argument("--prior", choices=("wiener", "none"), default="wiener",
                   help="wiener: per-shell ridge from the half-map FSC (RELION's τ²), or none (default: %(default)s)")
    p.add_argument("--shell-ridge", type=NON_NEGATIVE, default=1e-3, metavar="ρ",
                   help="ridge floor: this fraction of each shell's mean data density (default: 1e-3)")
    p.add_argument("--d0", choices=("exact", "one"), default="exact",
                   help="Algorithm 1's initial diagonal: the exact one of the first pass, or one as in the paper "
                        "(default: %(default)s)")
    p.add_argument("--start", choices=("backprojection", "zero"), default="backprojection",
                   help="SGD methods' first map: the one-pass map, or zero as in the paper (default: %(default)s)")
    p.add_argument("--noise", choices=("white", "estimate"), default="white",
                   help="white (σ = 1, as the paper and relion_reconstruct) or estimate (σ² per image shell and "
                        "optics group, from the residuals to the one-pass maps) (default: %(default)s)")
    p.add_argument("--store", choices=("auto", "memory", "disk"), default="auto",
                   help="keep the FFT'd images in memory, re-read them from disk every pass, or auto: memory when "
                        "they take less than half of what is free (default: %(default)s)")
    p.add_argument("--store-dtype", choices=("complex64", "bfloat16"), default="complex64",
                   help="precision of the images kept in memory; bfloat16 takes half (default: %(default)s)")
    p.add_argument("--pixel-size", type=POSITIVE, metavar="Å", help="pixel size for STAR 3.0 files that lack it")
    p.add_argument("--seed", type=NATURAL, default=0, help="random seed: batch order, probes, half-set split (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from FOLDER/checkpoint.pt")
    _add_common(p)
    p.set_defaults(run=_reconstruct, checkpoints=("checkpoint.pt",))


def _refine_args(commands) -> None:
    p = commands.add_parser("refine", help="gold-standard refinement with unknown poses from a reference",
                            description="Gold-standard refinement with unknown poses: pose search alternating with "
                                        "map updates, from a low-resolution reference (docs/refinement.md).")
    p.add_argument("star", type=_path, metavar="PARTICLES.star", help="particles with CTFs (STAR 3.0/3.1)")
    p.add_argument("--ref", type=_path, required=True, metavar="START.mrc",
                   help="reference map (any box and voxel size; resampled, low-passed to --ini-res)")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="FOLDER", help="output folder")
    p.add_argument("--ini-res", type=POSITIVE, default=30.0, metavar="Å",
                   help="low-pass of the reference; sets the first search band (default: 30 Å)")
    p.add_argument("--particle-diameter", type=POSITIVE, metavar="Å",
                   help="diameter of the soft spherical mask (default: 0.8 × the box)")
    p.add_argument("--mask", type=_path, metavar="MASK.mrc", help="a mask for the references instead of the sphere")
    p.add_argument("--sym", default="C1", metavar="GROUP", help="point group: C1, Cn, Dn, T, O, I (RELION's; default C1)")
    p.add_argument("--update", choices=("em", "sgd"), default="em",
                   help="map update per iteration: em (one pass, the one-pass map) or sgd (an epoch of Algorithm 1, "
                        "poses searched per minibatch) (default: %(default)s)")
    p.add_argument("--max-iter", type=COUNT, default=20, metavar="N", help="most iterations (default: 20)")
    p.add_argument("--local", action="store_true", help="start from the STAR file's poses (local searches only)")
    p.add_argument("--soft-poses", type=COUNT, default=19, metavar="N",
                   help="poses per particle in the maps of the iterations without a global search and of the last, "
                        "the most likely of a grid around its best pose, weighed by their posterior; 1: the best pose "
                        "alone (default: 19, the whole grid)")
    p.add_argument("--max-shift", type=POSITIVE, metavar="Å", help="origins searched within this radius "
                                                                    "(default: 5 pixels)")
    p.add_argument("--join-res", type=POSITIVE, default=40.0, metavar="Å",
                   help="the half maps are averaged below this resolution; no finer than 1.5 × the Nyquist "
                        "resolution (default: 40 Å, as RELION)")
    p.add_argument("--batch-size", type=COUNT, default=1000, metavar="N", help="images per batch (default: 1000)")
    p.add_argument("--box", type=COUNT, metavar="PX", help="working box (px): Fourier-crop the images to it")
    p.add_argument("--pixel-size", type=POSITIVE, metavar="Å", help="pixel size for STAR 3.0 files that lack it")
    p.add_argument("--seed", type=NATURAL, default=0, help="random seed: half-set split, batch order (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from FOLDER/checkpoint.pt")
    _add_common(p)
    p.set_defaults(run=_refine, checkpoints=("checkpoint.pt",))


def _abinitio_args(commands) -> None:
    p = commands.add_parser("abinitio", help="an initial map from particles alone",
                            description="Ab initio: an initial map and poses from particles alone, by SGD with poses "
                                        "searched on every minibatch (docs/abinitio.md). The hand of the map cannot "
                                        "be determined from projections.")
    p.add_argument("star", type=_path, metavar="PARTICLES.star", help="particles with CTFs (STAR 3.0/3.1)")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="FOLDER", help="output folder")
    p.add_argument("--particle-diameter", type=POSITIVE, metavar="Å",
                   help="diameter of the soft spherical mask (default: 0.8 × the box)")
    p.add_argument("--start-res", type=POSITIVE, default=35.0, metavar="Å", help="first band (default: 35 Å)")
    p.add_argument("--end-res", type=POSITIVE, default=12.0, metavar="Å", help="last band (default: 12 Å)")
    p.add_argument("--epochs", type=POSITIVE, default=3.0, metavar="E", help="passes over the particles (default: 3)")
    p.add_argument("--batch-size", type=COUNT, default=200, metavar="N",
                   help="images per step on average; they grow 3× over the run (default: 200)")
    p.add_argument("--max-shift", type=POSITIVE, metavar="Å", help="origins searched within this radius "
                                                                    "(default: 2 working pixels)")
    p.add_argument("--flip-hand", action="store_true", help="write the mirror image of the map (the other hand)")
    p.add_argument("--pixel-size", type=POSITIVE, metavar="Å", help="pixel size for STAR 3.0 files that lack it")
    p.add_argument("--seed", type=NATURAL, default=0, help="random seed: start map, minibatches (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from FOLDER/checkpoint.pt")
    _add_common(p)
    p.set_defaults(run=_abinitio, checkpoints=("checkpoint.pt",))


def _postprocess_args(commands) -> None:
    p = commands.add_parser("postprocess", help="mask, corrected FSC, B-factor and sharpened map",
                            description="Post-processing of two half maps, as relion_postprocess: a soft mask (or "
                                        "--mask), the FSC corrected for the mask by phase randomisation, the "
                                        "B-factor from the Guinier plot, the sharpened FSC-weighted map.")
    p.add_argument("half1", type=_path, metavar="HALF1.mrc")
    p.add_argument("half2", type=_path, metavar="HALF2.mrc")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="FOLDER", help="output folder")
    p.add_argument("--mask", type=_path, metavar="MASK.mrc", help="a mask instead of the automatic one")
    p.add_argument("--lowpass", type=POSITIVE, default=15.0, metavar="Å",
                   help="low-pass of the joint map the automatic mask is made from (default: 15 Å)")
    p.add_argument("--autob-lowres", type=POSITIVE, default=10.0, metavar="Å",
                   help="the Guinier fit starts at this resolution (default: 10 Å)")
    _add_common(p, device=False)
    p.set_defaults(run=_postprocess)


def _auto_args(commands) -> None:
    p = commands.add_parser("auto", help="particles to a sharpened map: ab initio, refinement, post-processing",
                            description="Ab initio → refinement (halves split at refinement, from the ab initio map "
                                        "low-passed to 30 Å) → post-processing, each stage in its own subfolder; "
                                        "map_sharpened.mrc, particles.star and report.md at the top.")
    p.add_argument("star", type=_path, metavar="PARTICLES.star", help="particles with CTFs (STAR 3.0/3.1)")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="FOLDER", help="output folder")
    p.add_argument("--particle-diameter", type=POSITIVE, metavar="Å",
                   help="diameter of the soft spherical mask (default: 0.8 × the box)")
    p.add_argument("--sym", default="C1", metavar="GROUP", help="point group of the refinement (default C1)")
    p.add_argument("--max-iter", type=COUNT, default=20, metavar="N", help="most refinement iterations (default: 20)")
    p.add_argument("--pixel-size", type=POSITIVE, metavar="Å", help="pixel size for STAR 3.0 files that lack it")
    p.add_argument("--seed", type=NATURAL, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue at the stage and step where a run stopped")
    _add_common(p)
    p.set_defaults(run=_auto, checkpoints=("abinitio/checkpoint.pt", "refine/checkpoint.pt"))


def _flip_args(commands) -> None:
    p = commands.add_parser("flip", help="the mirror image of a map (the other hand)",
                            description="Write the mirror image of a map (z → −z through the box centre): a map of "
                                        "the other hand, which projections cannot tell apart.")
    p.add_argument("map", type=_path, metavar="MAP.mrc")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="OUT.mrc", help="the mirrored map")
    _add_common(p, device=False)
    p.set_defaults(run=_flip)


def _fsc_args(commands) -> None:
    p = commands.add_parser("fsc", help="FSC of two maps",
                            description="FSC of two maps per RELION shell, and the resolutions at 0.5 and 0.143.")
    p.add_argument("map_a", type=_path, metavar="A.mrc")
    p.add_argument("map_b", type=_path, metavar="B.mrc")
    p.add_argument("--mask", type=_path, metavar="MASK.mrc", help="multiply both maps by this mask first")
    p.set_defaults(run=_fsc)


def _hessian_args(commands) -> None:
    p = commands.add_parser("hessian", help="the paper's conditioning analysis on your particles",
                            description="Hessian diagonal (MRC), its radial profile and κ(R), as in the paper's "
                                        "conditioning analysis (docs/reproduction.md).")
    p.add_argument("star", type=_path, metavar="PARTICLES.star", help="particles with poses (and CTFs)")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="FOLDER", help="output folder")
    _interp(p)
    p.add_argument("--method", choices=("exact", "hutchinson"), default="exact",
                   help="exact (one scatter of squared weights) or hutchinson (default: %(default)s)")
    p.add_argument("--probes", type=COUNT, default=100, metavar="N", help="Hutchinson probes (default: 100)")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF (H of the projections alone)")
    p.add_argument("--box", type=COUNT, metavar="PX", help="working box (px): the Fourier-cropped grid to analyse")
    p.add_argument("--l2", type=POSITIVE, default=1e-8, metavar="λ", help="ridge added to H (default: 1e-8)")
    p.add_argument("--batch-size", type=COUNT, default=1000, metavar="N", help="images per pass and probe (default: 1000)")
    p.add_argument("--lanczos-iterations", type=NATURAL, default=30, metavar="N",
                   help="Lanczos steps for κ of H and D⁻¹H, trilinear only; 0 skips (default: 30)")
    p.add_argument("--lanczos-radii", type=COUNT, default=6, metavar="N", help="ball radii for Lanczos (default: 6)")
    p.add_argument("--pixel-size", type=POSITIVE, metavar="Å", help="pixel size for STAR 3.0 files that lack it")
    p.add_argument("--seed", type=NATURAL, default=0, help="random seed: probes, Lanczos starts (default: 0)")
    _add_common(p)
    p.set_defaults(run=_hessian)


def _demo_args(commands) -> None:
    p = commands.add_parser("demo", help="simulate ubiquitin particles and reconstruct them",
                            description="Simulate particles of ubiquitin (PDB 1UBQ, shipped; box 64, 1.5 Å, SNR 0.01) "
                                        "and reconstruct them with known poses.")
    p.add_argument("-o", "--output", type=_path, default=Path("cryosgd-demo"), metavar="FOLDER",
                   help="output folder (default: cryosgd-demo)")
    p.add_argument("-n", "--particles", type=_number(int, 2), default=6000, metavar="N",
                   help="number of particles (default: 6000)")
    p.add_argument("--seed", type=NATURAL, default=0, help="random seed (default: 0)")
    _add_common(p)
    p.set_defaults(run=_demo)


def _project(a) -> None:
    from cryosgd.api import project
    from cryosgd.resources import resolve_device

    star = project(a.map, a.star, a.output, force=a.force, interp=a.interp, use_ctf=a.ctf, pad=a.pad,
                   batch_size=a.batch_size, device=resolve_device(a.device))
    print(f"wrote {a.output} and {star}")


def _simulate(a) -> None:
    from cryosgd.api import simulate
    from cryosgd.resources import resolve_device
    from cryosgd.sim.simulate import SimulationSettings

    settings = SimulationSettings(n_particles=a.particles, snr=a.snr, shift_sigma_A=a.shift_sigma,
                                  defocus_min_A=a.defocus_min, defocus_max_A=a.defocus_max,
                                  astigmatism_max_A=a.astigmatism, bfactor_A2=a.bfactor, seed=a.seed)
    star = simulate(a.source, a.output, settings, box_px=a.box, pixel_A=a.pixel_size, poses_star=a.poses,
                    device=resolve_device(a.device), force=a.force)
    print(f"wrote {star}, {a.output / 'particles.mrcs'} and {a.output / 'ground_truth.mrc'}")


def _reconstruct(a) -> None:
    from cryosgd import dist
    from cryosgd.api import reconstruct
    from cryosgd.recon.settings import ReconstructionSettings

    settings = ReconstructionSettings(method=a.method, epochs=a.epochs, max_epochs=a.max_epochs,
                                      batch_size=a.batch_size, interp=a.interp, work_box_px=a.box, l2=a.l2,
                                      prior=a.prior, shell_ridge=a.shell_ridge, d0=a.d0, start=a.start, noise=a.noise,
                                      store=a.store, store_dtype=a.store_dtype, seed=a.seed)
    result = reconstruct(a.star, a.output, settings, resume=a.resume, force=a.force, device=a.device,
                         pixel_A=a.pixel_size)
    if dist.is_main():
        print(f"resolution (half-map FSC = 0.143): {result.resolution_A:.2f} Å (maps of epoch {result.epoch})")
        print(f"maps: {a.output / 'map.mrc'}, {a.output / 'half1.mrc'}, {a.output / 'half2.mrc'}; "
              f"FSC: {a.output / 'fsc.csv'}, {a.output / 'fsc.png'}; progress: {a.output / 'progress.png'}")


def _refine(a) -> None:
    from cryosgd import dist
    from cryosgd.api import refine
    from cryosgd.recon.settings import RefineSettings
    from cryosgd.report import plural

    settings = RefineSettings(ini_res_A=a.ini_res, particle_diameter_A=a.particle_diameter, sym=a.sym,
                              work_box_px=a.box, max_iter=a.max_iter, update=a.update, join_res_A=a.join_res,
                              batch_size=a.batch_size, max_shift_A=a.max_shift, local=a.local,
                              soft_poses=a.soft_poses, seed=a.seed)
    result = refine(a.star, a.ref, a.output, settings, mask=a.mask, resume=a.resume, force=a.force, device=a.device,
                    pixel_A=a.pixel_size)
    if dist.is_main():
        print(f"resolution (half-map FSC = 0.143): {result.resolution_A:.2f} Å after "
              f"{plural(len(result.metrics), 'iteration')}")
        print(f"maps: {a.output / 'map.mrc'}, half maps beside it; poses: {a.output / 'particles.star'}; "
              f"plots: {a.output / 'fsc.png'}, {a.output / 'refinement.png'}")


def _abinitio(a) -> None:
    from cryosgd import dist
    from cryosgd.api import abinitio
    from cryosgd.recon.settings import AbInitioSettings

    settings = AbInitioSettings(particle_diameter_A=a.particle_diameter, start_res_A=a.start_res, end_res_A=a.end_res,
                                epochs=a.epochs, batch_size=a.batch_size, max_shift_A=a.max_shift, seed=a.seed,
                                flip_hand=a.flip_hand)
    abinitio(a.star, a.output, settings, resume=a.resume, force=a.force, device=a.device, pixel_A=a.pixel_size)
    if dist.is_main():
        print(f"initial map: {a.output / 'initial.mrc'}; poses: {a.output / 'particles.star'}; "
              f"plots: {a.output / 'sections.png'}, {a.output / 'abinitio.png'}")


def _postprocess(a) -> None:
    from cryosgd.api import postprocess

    result = postprocess(a.half1, a.half2, a.output, mask=a.mask, lowpass_A=a.lowpass, autob_lowres_A=a.autob_lowres,
                         force=a.force)
    print(result.summary)


def _auto(a) -> None:
    from cryosgd import dist
    from cryosgd.api import auto

    result = auto(a.star, a.output, particle_diameter_A=a.particle_diameter, sym=a.sym, max_iter=a.max_iter,
                  seed=a.seed, resume=a.resume, force=a.force, device=a.device, pixel_A=a.pixel_size)
    if dist.is_main():
        print(result.summary)


def _flip(a) -> None:
    from cryosgd.api import flip

    print(f"wrote {flip(a.map, a.output, force=a.force)} (the mirror image of {a.map})")


def _fsc(a) -> None:
    from cryosgd.api import fsc

    curve = fsc(a.map_a, a.map_b, a.mask)
    print("shell  resolution_A  fsc")
    for i, (r, f) in enumerate(zip(curve.resolution_A, curve.fsc)):
        print(f"{i:5d}  {r:12.2f}  {f:7.4f}")
    print(f"resolution at FSC 0.5: {curve.resolution_at(0.5):.2f} Å")
    print(f"resolution at FSC 0.143: {curve.resolution_at(0.143):.2f} Å")


def _hessian(a) -> None:
    from cryosgd.analysis.conditioning import HessianSettings
    from cryosgd.api import hessian

    settings = HessianSettings(interp=a.interp, method=a.method, probes=a.probes, use_ctf=not a.no_ctf,
                               work_box_px=a.box, l2=a.l2, batch_size=a.batch_size,
                               lanczos_iterations=a.lanczos_iterations, lanczos_radii=a.lanczos_radii, seed=a.seed)
    report = hessian(a.star, a.output, settings, force=a.force, pixel_A=a.pixel_size, device=a.device)
    r = len(report.radii) - 1
    print(f"κ of diag(H) at R = {int(report.radii[r])}: {report.kappa_diagonal[r]:.4g} (bound {report.bound[r]:.4g})")
    for radius, (kappa_h, kappa_p) in sorted(report.lanczos.items()):
        print(f"R = {radius}: κ(H) ≥ {kappa_h:.4g}, κ(D⁻¹H) ≥ {kappa_p:.4g} (Lanczos)")
    print(f"wrote {a.output / 'hessian_diagonal.mrc'}, radial_profile.csv/png, kappa.csv/png")


def _demo(a) -> None:
    from cryosgd.api import demo

    result = demo(a.output, a.particles, a.seed, force=a.force, device=a.device, on_simulated=lambda star: print(
        f"simulated {a.particles} particles of 1UBQ (box 64, 1.5 Å, SNR 0.01, B 60 Å²): {star}", flush=True))
    print(f"resolution: {result.reconstruction.resolution_A:.2f} Å (half-map FSC 0.143); "
          f"{result.against_truth.resolution_at(0.5):.2f} Å against the ground truth (FSC 0.5)")
    print(f"maps: {a.output / 'map.mrc'}, half maps beside it; plots: {a.output / 'fsc.png'}, "
          f"{a.output / 'fsc_truth.png'}, {a.output / 'progress.png'}, {a.output / 'particles.png'}")
    print(f"done in {result.seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn bad input and Ctrl-C into one line; returns the exit code."""
    quiet_openmp()
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "threads"):
            from cryosgd.resources import configure_threads

            configure_threads(args.threads)
        args.run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException as error:  # Ctrl-C, also when it struck inside an import
        if not (isinstance(error, KeyboardInterrupt) or isinstance(error.__context__, KeyboardInterrupt)):
            raise
        print(_interrupted(args, sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return 130
    return 0


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    out = getattr(args, "output", None)
    checkpoint = _last_checkpoint(Path(out), getattr(args, "checkpoints", ())) if out else None
    if checkpoint is None:
        return "interrupted: nothing was left half-written; run the command again to redo it"
    again = [a for a in argv if a not in ("--resume", "--force")]
    return (f"interrupted: the last finished step is in {checkpoint}; continue with: "
            f"cryosgd {shlex.join(again)} --resume")


def _last_checkpoint(out: Path, names: tuple[str, ...]) -> Path | None:
    """The newest of the command's checkpoints ``names`` (relative to ``out``; auto's are its
    stages'), or None: a command without any, or stopped before the first."""
    found = [out / name for name in names if (out / name).exists()]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def entry_point() -> None:
    keep_freed_memory()  # the process's own choice, so not in main(), which tests call in theirs
    code = main()
    if code == 130:  # interrupted: leave without finalising the interpreter, which a background
        for stream in (sys.stdout, sys.stderr):  # thread stopped mid-work can abort (exit −6)
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code)  # (atexit handlers, such as dist's process-group teardown, are skipped)
    sys.exit(code)
