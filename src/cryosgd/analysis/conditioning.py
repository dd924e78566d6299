"""``cryosgd hessian``: the Hessian diagonal and condition numbers of a particle set's loss.

Outputs in ``out_dir``:

- ``hessian_diagonal.mrc``: diag(H) per full-grid voxel (see :mod:`cryosgd.analysis.hessian`),
  an ``n³`` cube with frequency 0 at voxel ``(n/2, n/2, n/2)``; voxel ``(i, j, l)`` (z, y, x)
  is the frequency ``(l − n/2, j − n/2, i − n/2) / (n · pixel)`` Å⁻¹. The header's voxel size
  is the frequency step in Å⁻¹.
- ``radial_profile.csv`` / ``.png``: mean, min and max of diag(H) per shell round(|k|), with
  1/(2r), the mean for uniform orientations without CTF (PAPER.md §2.5).
- ``kappa.csv`` / ``.png``: κ(R) of the diagonal and the bound (1+λ)/(p+λ); for trilinear
  interpolation also Lanczos estimates of κ(R) of H restricted to the ball and of D⁻¹H at
  the radii of ``lanczos_radii`` (D = |diag H| floored at λ: a Hutchinson estimate can dip
  below 0). Ritz values lie inside the spectrum, so these estimates
  are lower bounds on the true κ that tighten with ``lanczos_iterations``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryosgd.analysis.hessian import (RestrictedHessian, full_grid, kappa_bound, kappa_of_diagonal,
                                      radial_profile)
from cryosgd.data.particles import read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid, voxel_multiplicity
from cryosgd.io.mrc import write_map
from cryosgd.objective.diagonal import exact_diagonal_sum, hutchinson_probe, rademacher
from cryosgd.objective.loss import LeastSquares
from cryosgd.recon.halves import HalfSet
from cryosgd.recon.settings import ReconstructionSettings
from cryosgd.report import save_curves, write_lines


@dataclass(frozen=True)
class HessianSettings:
    interp: str = "trilinear"
    method: str = "exact"  # "exact" (one scatter pass) or "hutchinson"
    probes: int = 100  # Hutchinson probes, one H·z on one batch each
    use_ctf: bool = True
    work_box_px: int | None = None
    l2: float = 1e-8
    batch_size: int = 1000
    lanczos_iterations: int = 30  # 0: no Lanczos estimates
    lanczos_radii: int = 6  # radii spread over 2 … n/2 − 1
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("exact", "hutchinson"):
            raise InputError(None, f"--method {self.method}: expected exact or hutchinson")
        if self.probes < 1 or self.lanczos_iterations < 0 or self.lanczos_radii < 1:
            raise InputError(None, "--probes and --lanczos-radii must be positive, --lanczos-iterations ≥ 0")


@dataclass(frozen=True)
class HessianReport:
    radii: np.ndarray
    kappa_diagonal: np.ndarray
    bound: np.ndarray
    lanczos: dict  # radius → (κ of H, κ of D⁻¹H)


def analyse(star: str | Path, out_dir: str | Path, settings: HessianSettings = HessianSettings(),
            pixel_A: float | None = None, device=None, dtype=torch.float64) -> HessianReport:
    """Compute and write the Hessian diagonal, its radial profile and κ(R) of ``star``'s particles."""
    out_dir = Path(out_dir)
    table = read_particles(star, pixel_A=pixel_A)
    table.require_poses()
    grid = FourierGrid.create(_box_px(table), table.pixel_A, settings.work_box_px, source=table.source)
    recon = ReconstructionSettings(interp=settings.interp, batch_size=settings.batch_size, l2=settings.l2,
                                   use_ctf=settings.use_ctf, seed=settings.seed)
    half = HalfSet(table, None, grid, recon, 0, device, dtype)  # poses and CTFs only: no images are read
    diagonal = _diagonal(half, settings)
    full = full_grid(diagonal)
    n = grid.work_box_px
    step_invA = 1.0 / (n * grid.work_pixel_A)
    write_map(out_dir / "hessian_diagonal.mrc", torch.fft.fftshift(full).float().cpu().numpy(), step_invA)
    _write_profile(out_dir, full, step_invA)
    radii = torch.arange(1, n // 2, dtype=torch.float64)
    kappa = kappa_of_diagonal(full, radii).cpu()
    bound = kappa_bound(radii, settings.l2)
    lanczos = _lanczos(half, diagonal, settings) if settings.interp == "trilinear" else {}
    _write_kappa(out_dir, radii.numpy(), kappa.numpy(), bound.numpy(), lanczos, step_invA)
    return HessianReport(radii.numpy(), kappa.numpy(), bound.numpy(), lanczos)


def _box_px(table) -> int:
    """The box from the optics groups (rlnImageSize), else from the stacks' headers."""
    boxes = {g.box_px for g in table.optics}
    if len(boxes) == 1 and None not in boxes:
        return boxes.pop()
    return ImageStack(table).box_px


def _diagonal(half: HalfSet, settings: HessianSettings) -> torch.Tensor:
    """Half-grid diag(H), mean over images, ridge included: exact, or Hutchinson's estimate."""
    if settings.method == "exact":
        return exact_hessian_diagonal(half)
    return next(itertools.islice(hutchinson_estimates(half, settings.seed), settings.probes - 1, None))


def _objective(half: HalfSet) -> LeastSquares:
    """The half's loss with the ridge λ of its settings (white noise)."""
    return LeastSquares(half.model, half.settings.l2)


def exact_hessian_diagonal(half: HalfSet) -> torch.Tensor:
    """diag(H) over all of ``half``'s images (mean over images, ridge included), one pass."""
    objective = _objective(half)
    data, = half.pass_mean(lambda batch: (exact_diagonal_sum(objective, batch, half.dtype),))
    return data + objective.ridge_diagonal(half.grid.volume_shape, half.device, half.dtype)


def full_hvp(half: HalfSet):
    """z ↦ H z over all of ``half``'s images, for a stack of maps ``z (K, n, n, nh)``."""
    objective = _objective(half)

    def apply(z: torch.Tensor) -> torch.Tensor:
        data, = half.pass_mean(lambda batch: (objective.data_hvp(z, batch),))
        return data + objective.ridge_gradient(z)
    return apply


def hutchinson_estimates(half: HalfSet, seed: int = 0) -> Iterator[torch.Tensor]:
    """Hutchinson's running estimate of diag(H) after each probe: one H·z per batch, epoch after
    epoch (the batch order of epoch e as in training)."""
    objective = _objective(half)
    generator = torch.Generator(device=half.device).manual_seed(seed)
    complex_dtype = torch.promote_types(half.dtype, torch.complex64)
    total, count = None, 0
    for epoch in itertools.count(1):
        for batch in half.parts(epoch):
            z = rademacher(half.grid.volume_shape, generator, complex_dtype, half.device)
            estimate = hutchinson_probe(objective, batch, z)
            total = estimate if total is None else total + estimate
            count += 1
            yield total / count


def _lanczos(half: HalfSet, diagonal: torch.Tensor, settings: HessianSettings) -> dict:
    """κ(R) of H and of D⁻¹H on the balls of ``settings.lanczos_radii`` radii."""
    if settings.lanczos_iterations == 0:
        return {}
    n = half.grid.work_box_px
    radii = torch.unique(torch.round(torch.linspace(2, n // 2 - 1, settings.lanczos_radii)))
    shape = diagonal.shape
    preconditioner = diagonal.abs().clamp(min=settings.l2)  # a Hutchinson estimate can dip below 0
    scales = {"H": voxel_multiplicity(shape, diagonal.device, diagonal.dtype).rsqrt(),
              "D⁻¹H": preconditioner.rsqrt()}
    kappas = {}
    for name, scale in scales.items():
        operator = RestrictedHessian(full_hvp(half), radii, scale)
        kappas[name] = operator.extremes(settings.lanczos_iterations, settings.seed).condition_number
    return {int(r): (float(kappas["H"][i]), float(kappas["D⁻¹H"][i])) for i, r in enumerate(radii)}


def _write_profile(out_dir: Path, full: torch.Tensor, step_invA: float) -> None:
    mean, low, high = (v.cpu().numpy() for v in radial_profile(full))
    shells = np.arange(len(mean))
    reference = np.where(shells > 0, 1 / (2 * np.maximum(shells, 1)), np.nan)
    rows = ["shell,freq_invA,resolution_A,mean,min,max,one_over_2r"] + [
        f"{s},{s * step_invA:.6g},{_resolution(s, step_invA):.4g},{m:.6g},{lo:.6g},{hi:.6g},{r:.6g}"
        for s, m, lo, hi, r in zip(shells, mean, low, high, reference)]
    write_lines(out_dir / "radial_profile.csv", rows)
    save_curves(out_dir / "radial_profile.png", shells[1:], {"mean diag(H)": mean[1:], "min": low[1:],
                                                             "max": high[1:], "1/(2r)": reference[1:]},
                xlabel="shell (voxels)", ylabel="diag(H) per voxel", title="Hessian diagonal by shell", log=True)


def _write_kappa(out_dir: Path, radii, kappa, bound, lanczos: dict, step_invA: float) -> None:
    rows = ["R,resolution_A,kappa_diagonal,bound,kappa_lanczos,kappa_preconditioned"]
    for r, k, b in zip(radii, kappa, bound):
        estimates = [f"{v:.6g}" for v in lanczos.get(int(r), ())] or ["", ""]
        rows.append(",".join([f"{int(r)}", f"{_resolution(r, step_invA):.4g}", f"{k:.6g}", f"{b:.6g}", *estimates]))
    write_lines(out_dir / "kappa.csv", rows)
    curves = {"κ of diag(H)": kappa, "bound (1+λ)/(p+λ)": bound}
    markers = {}
    if lanczos:
        keys = sorted(lanczos)
        markers = {"κ(H), Lanczos": (keys, [lanczos[k][0] for k in keys]),
                   "κ(D⁻¹H), Lanczos": (keys, [lanczos[k][1] for k in keys])}
    save_curves(out_dir / "kappa.png", radii, curves, markers=markers, xlabel="ball radius R (voxels)",
                ylabel="condition number", title="κ(R)", log=True)


def _resolution(shell: float, step_invA: float) -> float:
    return math.inf if shell == 0 else 1 / (shell * step_invA)
