"""The ``cryosgd`` command: a thin layer over the Python API.

Bad input ends with one line on stderr, ``error: FILE: what is wrong``, and exit code 2.
"""

from __future__ import annotations

import functools
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import typer

from cryosgd.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Cryo-EM reconstruction by preconditioned stochastic gradient descent.")

Interp = typer.Option("trilinear", "--interp", help="trilinear or nearest")
Device = typer.Option(None, "--device", help="torch device, e.g. cuda (default: cpu).")
StarPixelSize = typer.Option(None, "--pixel-size", help="Pixel size (Å) for STAR 3.0 files that lack it.")


def _one_line_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def _check_interp(interp: str) -> str:
    if interp not in ("trilinear", "nearest"):
        raise InputError(None, f"--interp {interp}: expected trilinear or nearest")
    return interp


@app.command()
@_one_line_errors
def project(
    map_path: Path = typer.Argument(..., metavar="MAP.mrc", help="Real-space map to project."),
    star: Path = typer.Argument(..., metavar="PARTICLES.star", help="Poses, origins and CTFs (STAR 3.0/3.1)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output stack (.mrcs); a .star is written beside it."),
    interp: str = Interp,
    ctf: bool = typer.Option(True, "--ctf/--no-ctf", help="Apply each particle's CTF."),
    pad: int = typer.Option(2, help="Fourier oversampling of the map (RELION's --pad)."),
    batch_size: int = typer.Option(256, help="Images per batch."),
    device: Optional[str] = Device,
):
    """Noise-free CTF-modulated projections of MAP at the STAR's poses (like relion_project --ctf)."""
    from cryosgd.model.project import project as run

    out_star = run(map_path, star, output, interp=_check_interp(interp), use_ctf=ctf, pad=pad,
                   batch_size=batch_size, device=device)
    typer.echo(f"wrote {output} and {out_star}")


@app.command()
@_one_line_errors
def simulate(
    source: Path = typer.Argument(..., metavar="MAP.mrc|MODEL.pdb|MODEL.cif", help="Map or atomic model."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    n_particles: int = typer.Option(1000, "-n", "--particles", help="Number of particles."),
    snr: float = typer.Option(0.1, help="Signal variance / noise variance per image."),
    box: Optional[int] = typer.Option(None, help="Box (px) for an atomic model."),
    pixel_size: Optional[float] = typer.Option(None, help="Pixel size (Å) for an atomic model."),
    poses: Optional[Path] = typer.Option(None, help="Take orientations from this STAR instead of uniform."),
    shift_sigma: float = typer.Option(3.0, help="Std of the random origins (Å)."),
    defocus_min: float = typer.Option(8000.0, help="Smallest mean defocus (Å)."),
    defocus_max: float = typer.Option(25000.0, help="Largest mean defocus (Å)."),
    astigmatism: float = typer.Option(1000.0, help="Largest defocus U − V (Å)."),
    bfactor: float = typer.Option(0.0, help="B-factor (Å²) of an envelope applied to the ground truth."),
    seed: int = typer.Option(0, help="Random seed."),
    device: Optional[str] = Device,
):
    """A particle dataset (STAR 3.1 + MRCS + ground_truth.mrc) with known poses, CTFs and noise."""
    from cryosgd.model.simulate import SimulationSettings
    from cryosgd.model.simulate import simulate as run

    settings = SimulationSettings(n_particles=n_particles, snr=snr, shift_sigma_A=shift_sigma,
                                  defocus_min_A=defocus_min, defocus_max_A=defocus_max,
                                  astigmatism_max_A=astigmatism, bfactor_A2=bfactor, seed=seed)
    star = run(source, output, settings, box_px=box, pixel_A=pixel_size, poses_star=poses, device=device)
    typer.echo(f"wrote {star}, {output / 'particles.mrcs'} and {output / 'ground_truth.mrc'}")


@app.command()
@_one_line_errors
def reconstruct(
    star: Path = typer.Argument(..., metavar="PARTICLES.star", help="Particles with known poses (STAR 3.0/3.1)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    method: str = typer.Option("algorithm1", help="algorithm1, sgd, exact-diag, cg or pcg (CG preconditioned by the exact diagonal)."),
    epochs: int = typer.Option(3, help="Passes over the data after the first (CG: iterations); 0 writes the one-pass map."),
    batch_size: int = typer.Option(1000, help="Images per step (the paper: 1000)."),
    interp: str = Interp,
    box: Optional[int] = typer.Option(None, help="Working box (px): Fourier-crop the images to it."),
    l2: float = typer.Option(1e-8, help="Ridge weight λ."),
    prior: str = typer.Option("wiener", help="wiener (per-shell ridge from the half-map FSC, as RELION's τ²) or none."),
    shell_ridge: float = typer.Option(1e-3, help="Ridge floor: this fraction of each shell's mean data density H·1."),
    d0: str = typer.Option("exact", help="Algorithm 1's initial diagonal: exact (from the first pass) or one (the paper)."),
    start: str = typer.Option("backprojection", help="SGD methods' first map: backprojection (the one-pass map b / H·1) or zero (the paper)."),
    noise: str = typer.Option("white", help="white (σ = 1: the paper, relion_reconstruct) or estimate (σ² per "
                                            "image shell from the residuals to the one-pass maps; costs a second "
                                            "first pass; for coloured noise, as in real micrographs)."),
    pixel_size: Optional[float] = StarPixelSize,
    device: Optional[str] = Device,
    seed: int = typer.Option(0, help="Random seed (batch order, probes, half-set split)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTDIR/checkpoint.pt."),
):
    """Gold-standard known-pose reconstruction: half maps, map, FSC, metrics, plots, checkpoints."""
    from cryosgd.recon.gold_standard import reconstruct as run
    from cryosgd.recon.known_pose import ReconstructionSettings

    settings = ReconstructionSettings(method=method, epochs=epochs, batch_size=batch_size,
                                      interp=_check_interp(interp), work_box_px=box, l2=l2, prior=prior,
                                      shell_ridge=shell_ridge, d0=d0, start=start, noise=noise, seed=seed)
    result = run(star, output, settings, resume=resume, device=device, pixel_A=pixel_size)
    typer.echo(f"resolution (half-map FSC = 0.143): {result.resolution_A:.2f} Å")
    typer.echo(f"maps: {output / 'map.mrc'}, {output / 'half1.mrc'}, {output / 'half2.mrc'}; "
               f"FSC: {output / 'fsc.csv'}, {output / 'fsc.png'}")


@app.command()
@_one_line_errors
def fsc(
    map_a: Path = typer.Argument(..., metavar="A.mrc"),
    map_b: Path = typer.Argument(..., metavar="B.mrc"),
    mask: Optional[Path] = typer.Option(None, help="Multiply both maps by this mask first."),
):
    """FSC of two maps per RELION shell, and the resolutions at FSC 0.5 and 0.143."""
    from cryosgd.analysis.fsc import fsc as compute
    from cryosgd.io.mrc import read_map

    a, pixel_A = read_map(map_a)
    b, _ = read_map(map_b)
    m = None if mask is None else read_map(mask)[0]
    for path, other in ((map_b, b), (mask, m)):
        if other is not None and other.shape != a.shape:
            raise InputError(path, f"shape {other.shape} differs from {map_a} {a.shape}")
    curve = compute(a, b, pixel_A, m)
    typer.echo("shell  resolution_A  fsc")
    for i, (r, f) in enumerate(zip(curve.resolution_A, curve.fsc)):
        typer.echo(f"{i:5d}  {r:12.2f}  {f:7.4f}")
    typer.echo(f"resolution at FSC 0.5: {curve.resolution_at(0.5):.2f} Å")
    typer.echo(f"resolution at FSC 0.143: {curve.resolution_at(0.143):.2f} Å")


@app.command()
@_one_line_errors
def hessian(
    star: Path = typer.Argument(..., metavar="PARTICLES.star", help="Particles with poses (and CTFs)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    interp: str = Interp,
    method: str = typer.Option("exact", help="exact (one scatter of squared weights) or hutchinson."),
    probes: int = typer.Option(100, help="Hutchinson probes (one H·z on one batch each)."),
    no_ctf: bool = typer.Option(False, "--no-ctf", help="Ignore the CTF (H of the projections alone)."),
    box: Optional[int] = typer.Option(None, help="Working box (px): the Fourier-cropped grid to analyse."),
    l2: float = typer.Option(1e-8, help="Ridge λ added to H."),
    batch_size: int = typer.Option(1000, help="Images per pass (and per Hutchinson probe)."),
    lanczos_iterations: int = typer.Option(30, help="Lanczos steps for κ of H and D⁻¹H (trilinear; 0: skip)."),
    lanczos_radii: int = typer.Option(6, help="Ball radii for the Lanczos estimates."),
    pixel_size: Optional[float] = StarPixelSize,
    device: Optional[str] = Device,
    seed: int = typer.Option(0),
):
    """Hessian diagonal (MRC), its radial profile and κ(R), as in the paper's conditioning analysis."""
    from cryosgd.analysis.conditioning import HessianSettings, analyse

    settings = HessianSettings(interp=_check_interp(interp), method=method, probes=probes, use_ctf=not no_ctf,
                               work_box_px=box, l2=l2, batch_size=batch_size, lanczos_iterations=lanczos_iterations,
                               lanczos_radii=lanczos_radii, seed=seed)
    report = analyse(star, output, settings, pixel_A=pixel_size, device=device)
    r = len(report.radii) - 1
    typer.echo(f"κ of diag(H) at R = {int(report.radii[r])}: {report.kappa_diagonal[r]:.4g} "
               f"(bound {report.bound[r]:.4g})")
    for radius, (kappa_h, kappa_p) in sorted(report.lanczos.items()):
        typer.echo(f"R = {radius}: κ(H) ≥ {kappa_h:.4g}, κ(D⁻¹H) ≥ {kappa_p:.4g} (Lanczos)")
    typer.echo(f"wrote {output / 'hessian_diagonal.mrc'}, radial_profile.csv/png, kappa.csv/png")


@app.command()
@_one_line_errors
def demo(
    output: Path = typer.Option(Path("cryosgd-demo"), "-o", "--output", help="Output folder."),
    n_particles: int = typer.Option(6000, "-n", "--particles"),
    epochs: int = typer.Option(3),
    seed: int = typer.Option(0),
):
    """Simulate particles of ubiquitin (PDB 1UBQ, shipped) and reconstruct them with known poses."""
    import numpy as np

    from cryosgd.analysis.fsc import fsc as compute_fsc
    from cryosgd.data.particles import read_particles
    from cryosgd.data.stack import ImageStack
    from cryosgd.io.mrc import read_map
    from cryosgd.model.simulate import SimulationSettings, simulate as run_simulate
    from cryosgd.recon.gold_standard import reconstruct as run_reconstruct
    from cryosgd.recon.known_pose import ReconstructionSettings
    from cryosgd.report import save_montage

    start = time.perf_counter()
    model = resources.files("cryosgd") / "data" / "1ubq.pdb"
    with resources.as_file(model) as pdb:
        settings = SimulationSettings(n_particles=n_particles, snr=0.01, defocus_min_A=5000.0,
                                      defocus_max_A=15000.0, bfactor_A2=60.0, seed=seed)
        star = run_simulate(pdb, output / "data", settings, box_px=64, pixel_A=1.5)
    typer.echo(f"simulated {n_particles} particles of 1UBQ (box 64, 1.5 Å, SNR 0.01, B 60 Å²): {star}")
    save_montage(output / "particles.png", {"simulated particles": ImageStack(read_particles(star)).read(np.arange(6))})
    result = run_reconstruct(star, output, ReconstructionSettings(epochs=epochs, seed=seed))
    truth, pixel_A = read_map(output / "data" / "ground_truth.mrc")
    reconstruction, _ = read_map(output / "map.mrc")
    against_truth = compute_fsc(reconstruction, truth, pixel_A)
    typer.echo(f"resolution: {result.resolution_A:.2f} Å (half-map FSC 0.143); "
               f"{against_truth.resolution_at(0.5):.2f} Å against the ground truth (FSC 0.5)")
    typer.echo(f"maps: {output / 'map.mrc'}, half maps beside it; plots: {output / 'fsc.png'}, "
               f"{output / 'loss.png'}, {output / 'particles.png'}")
    typer.echo(f"done in {time.perf_counter() - start:.0f} s")


def main() -> None:  # pragma: no cover
    app()
