"""The ``cryosgd`` command: a thin layer over :mod:`cryosgd.api` (argparse; nothing heavy is
imported before the arguments are checked, so ``--help`` and mistakes answer at once).

Bad input ends with one line on stderr, ``error: FILE: what is wrong`` (or ``error: argument
--option: …``), and exit code 2; Ctrl-C with one line saying how to continue (exit code 130).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cryosgd.errors import InputError
from cryosgd.resources import quiet_openmp


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float | None = None, open_low: bool = False):
    """An argparse type: ``kind`` values ≥ ``low`` (> ``low`` when ``open_low``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or (low is not None and (value < low or (open_low and value == low))):
            raise argparse.ArgumentTypeError(f"{text}: must be {'>' if open_low else '≥'} {low:g}")
        return value
    return parse


POSITIVE, NON_NEGATIVE = _number(float, 0, open_low=True), _number(float, 0)
COUNT, NATURAL = _number(int, 1), _number(int, 0)


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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    for add in (_project_args, _simulate_args, _reconstruct_args, _fsc_args, _hessian_args, _demo_args):
        add(commands)
    return parser


def _project_args(commands) -> None:
    p = commands.add_parser("project", help="noise-free CTF-modulated projections at a STAR file's poses",
                            description="Noise-free CTF-modulated projections of MAP at the STAR's poses, origins "
                                        "and CTFs (like relion_project --ctf). Writes OUT.mrcs and OUT.star.")
    p.add_argument("map", type=Path, metavar="MAP.mrc", help="real-space map to project")
    p.add_argument("star", type=Path, metavar="PARTICLES.star", help="poses, origins and CTFs (STAR 3.0/3.1)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.mrcs",
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
    p.add_argument("source", type=Path, metavar="MAP.mrc|MODEL.pdb|MODEL.cif", help="map or atomic model")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FOLDER", help="output folder")
    p.add_argument("-n", "--particles", type=COUNT, default=1000, metavar="N", help="number of particles (default: 1000)")
    p.add_argument("--snr", type=POSITIVE, default=0.1, help="signal variance / noise variance per image (default: 0.1)")
    p.add_argument("--box", type=COUNT, metavar="PX", help="box (px) for an atomic model")
    p.add_argument("--pixel-size", type=POSITIVE, metavar="Å", help="pixel size (Å) for an atomic model")
    p.add_argument("--poses", type=Path, metavar="STAR", help="take orientations from this STAR file instead of uniform")
    p.add_argument("--shift-sigma", type=NON_NEGATIVE, default=3.0, metavar="Å", help="std of the origins (default: 3 Å)")
    p.add_argument("--defocus-min", type=POSITIVE, default=8000.0, metavar="Å", help="smallest mean defocus (default: 8000 Å)")
    p.add_argument("--defocus-max", type=POSITIVE, default=25000.0, metavar="Å", help="largest mean defocus (default: 25000 Å)")
    p.add_argument("--astigmatism", type=NON_NEGATIVE, default=1000.0, metavar="Å", help="largest defocus U − V (default: 1000 Å)")
    p.add_argument("--bfactor", type=NON_NEGATIVE, default=0.0, metavar="Å²", help="B-factor envelope of the ground truth (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_common(p)
    p.set_defaults(run=_simulate)


def _reconstruct_args(commands) -> None:
    p = commands.add_parser("reconstruct", help="gold-standard reconstruction with known poses",
                            description="Gold-standard known-pose reconstruction: half maps, map, FSC, metrics, plots, "
                                        "checkpoints (docs/reconstruction.md).")
    p.add_argument("star", type=Path, metavar="PARTICLES.star", help="particles with known poses (STAR 3.0/3.1)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FOLDER", help="output folder")
    p.add_argument("--method", choices=("algorithm1", "sgd", "exact-diag", "cg", "pcg"), default="algorithm1",
                   help="algorithm1 (the paper's), sgd, exact-diag, cg, or pcg (CG preconditioned by the exact "
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
    p.add_argument("--seed", type=int, default=0, help="random seed: batch order, probes, half-set split (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from FOLDER/checkpoint.pt")
    _add_common(p)
    p.set_defaults(run=_reconstruct, resumable=True)


def _fsc_args(commands) -> None:
    p = commands.add_parser("fsc", help="FSC of two maps",
                            description="FSC of two maps per RELION shell, and the resolutions at 0.5 and 0.143.")
    p.add_argument("map_a", type=Path, metavar="A.mrc")
    p.add_argument("map_b", type=Path, metavar="B.mrc")
    p.add_argument("--mask", type=Path, metavar="MASK.mrc", help="multiply both maps by this mask first")
    p.set_defaults(run=_fsc)


def _hessian_args(commands) -> None:
    p = commands.add_parser("hessian", help="the paper's conditioning analysis on your particles",
                            description="Hessian diagonal (MRC), its radial profile and κ(R), as in the paper's "
                                        "conditioning analysis (docs/reproduction.md).")
    p.add_argument("star", type=Path, metavar="PARTICLES.star", help="particles with poses (and CTFs)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FOLDER", help="output folder")
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
    p.add_argument("--seed", type=int, default=0, help="random seed: probes, Lanczos starts (default: 0)")
    _add_common(p)
    p.set_defaults(run=_hessian)


def _demo_args(commands) -> None:
    p = commands.add_parser("demo", help="simulate ubiquitin particles and reconstruct them",
                            description="Simulate particles of ubiquitin (PDB 1UBQ, shipped; box 64, 1.5 Å, SNR 0.01) "
                                        "and reconstruct them with known poses.")
    p.add_argument("-o", "--output", type=Path, default=Path("cryosgd-demo"), metavar="FOLDER",
                   help="output folder (default: cryosgd-demo)")
    p.add_argument("-n", "--particles", type=_number(int, 2), default=6000, metavar="N",
                   help="number of particles (default: 6000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
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
    except KeyboardInterrupt:
        print(_interrupted(getattr(args, "resumable", False), sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return 130
    return 0


def _interrupted(resumable: bool, argv: list[str]) -> str:
    if not resumable:
        return "interrupted: nothing was left half-written; run the command again to redo it"
    args = [a for a in argv if a not in ("--resume", "--force")]
    return ("interrupted: the last finished epoch is in the output folder's checkpoint.pt; continue with: "
            f"cryosgd {shlex.join(args)} --resume")


def entry_point() -> None:
    sys.exit(main())
