"""The pose error the data allow: the Cramér–Rao bound on each particle's rotation.

    python benchmarks/pose_error_bound.py --workdir DIR [--star particles.star] [--particles 2000] [--draws 200]

``DIR`` is a refine_vs_relion.py workdir: ``particles.star`` (images and true poses; ``--star``
another STAR file of images with their true poses),
``truth.mrc`` and, for the model check, ``clean.star`` (noise-free images of the first
particles). For each particle, the Fisher information of its pose — three rotation
coordinates (tangent, right-multiplied: ``R·exp(u)``) and the two origin coordinates — is

    I = Σ_k w_k Re(conj(∂μ_k) ∂μ_k),   μ = CTF · e^{2πik·t} · slice(truth, R),

with w_k = m_k/σ²_k the weight the pose search scores by (:class:`cryosgd.pose.search.BandImages`,
Nyquist band) and σ² per shell from the residuals of the images at their true poses against
the truth. The derivatives are central differences (0.25°, 0.25 pixel) of slices of the truth
zero-padded to twice its box (trilinear on a twice finer Fourier grid). The rotation block of
I⁻¹ (the origin unknown) bounds the covariance of any unbiased estimate; the script prints the
median of |e| for e ~ N(0, that block), ``--draws`` per particle: the median rotation error of
an efficient estimator given the true map itself. A refinement, whose references are
estimated from the same images, cannot be expected to do better.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryosgd.conventions import map_to_ft
from cryosgd.data.particles import read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import extract
from cryosgd.io.mrc import read_map
from cryosgd.pose.scores import band_mask
from cryosgd.pose.search import BandImages
from cryosgd.pose.shifts import phase_ramps
from cryosgd.pose.so3 import exp_map
from cryosgd.recon.gold_standard import split_halves
from cryosgd.recon.halves import HalfSet
from cryosgd.recon.settings import ReconstructionSettings


class Truth:
    """The truth's transform on a twice finer Fourier grid, and the images' model ``μ``."""

    def __init__(self, volume: np.ndarray):
        n = volume.shape[0]
        padded = torch.zeros(2 * n, 2 * n, 2 * n, dtype=torch.float64)
        padded[n // 2:n // 2 + n, n // 2:n // 2 + n, n // 2:n // 2 + n] = torch.as_tensor(volume, dtype=torch.float64)
        self.volume_ft = map_to_ft(padded)

    def model(self, images: BandImages, rotations: Tensor, shift_A: Tensor) -> Tensor:
        """``(B, P)`` CTF · e^{2πik·t} · slice: the images' noise-free values (as the search scores them)."""
        slices = extract(self.volume_ft, rotations, 2 * images.freq_px.double())
        return images.ctf.double() * phase_ramps(images.freq_invA.double(), shift_A[:, None])[:, 0] * slices


def batches(star: Path, count: int, half: int | None = None) -> tuple[list, FourierGrid]:
    """The first ``count`` particles of ``star`` in batches (the engine's images: FFT'd, on the
    disc); with ``half`` (1 or 2), of that half-set as cryosgd's commands split them by default."""
    table = read_particles(star)
    settings = ReconstructionSettings(batch_size=250)
    index = np.arange(len(table)) if half is None else split_halves(table, settings.seed)[half - 1]
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A, None, source=star)
    chosen = HalfSet(table.subset(index[:count]), stack.subset(index[:count]), grid, settings, 1, dtype=torch.float64)
    return list(chosen.parts(None)), grid


def residual_spectrum(truth: Truth, parts: list, grid: FourierGrid, band_px: float) -> tuple[Tensor, float]:
    """σ² per image shell from the residuals at the true poses, pooled over the optics groups and
    given to each, ``(G, shells)``, and the residual's power relative to the images' (the model
    check on noise-free images)."""
    shells = grid.shell_px[band_mask(grid.freq_px, band_px)]
    sums = torch.zeros(int(grid.shell_px.max()) + 1, dtype=torch.float64)
    counts, residual, total = torch.zeros_like(sums), 0.0, 0.0
    groups = 1 + max(int(batch.groups().max()) for batch in parts)
    ones = torch.ones(groups, len(sums), dtype=torch.float64)
    for batch in parts:
        images = BandImages.of(batch, grid, band_px, ones)
        model = truth.model(images, batch.rotations.double(), batch.shift_A.double())
        r = images.images_ft.to(torch.complex128) - model
        power = r.real.square() + r.imag.square()
        sums.index_add_(0, shells, power.sum(0))
        counts.index_add_(0, shells, torch.full_like(power[0], len(batch)))
        residual, total = residual + float(power.sum()), total + float(images.images_ft.abs().square().sum())
    return (sums / counts.clamp(min=1)).expand(groups, -1), residual / total


def rotation_covariance(truth: Truth, images: BandImages, rotations: Tensor, shift_A: Tensor,
                        step_rad: float, step_A: float) -> Tensor:
    """``(B, 3, 3)`` the rotation block of the inverse Fisher information (radians²)."""
    derivatives = []
    for axis in range(3):
        turn = torch.zeros(3, dtype=torch.float64)
        turn[axis] = step_rad
        plus, minus = (truth.model(images, rotations @ exp_map(sign * turn), shift_A) for sign in (1, -1))
        derivatives.append((plus - minus) / (2 * step_rad))
    for axis in range(2):
        move = torch.zeros(2, dtype=torch.float64)
        move[axis] = step_A
        plus, minus = (truth.model(images, rotations, shift_A + sign * move) for sign in (1, -1))
        derivatives.append((plus - minus) / (2 * step_A))
    d = torch.stack(derivatives, 1)  # (B, 5, P)
    fisher = torch.einsum("bip,bjp,bp->bij", d.conj(), d, images.weight.double().to(d.dtype)).real
    return torch.linalg.inv(fisher)[:, :3, :3]


def bound_deg(root: Path, star: str = "particles.star", particles: int = 2000, draws: int = 200) -> np.ndarray:
    """Rotation errors (degrees) drawn from each particle's bound, ``draws`` per particle, for
    the first ``particles`` of ``root / star``; prints the model check on ``clean.star``."""
    torch.set_grad_enabled(False)
    volume, _ = read_map(root / "truth.mrc")
    truth = Truth(volume)
    band = volume.shape[0] / 2 - 1
    if (root / "clean.star").exists():
        clean, grid = batches(root / "clean.star", particles)
        print(f"model check, noise-free images: residual power {residual_spectrum(truth, clean, grid, band)[1]:.2e} "
              "of the images'")
    parts, grid = batches(root / star, particles)
    sigma2, _ = residual_spectrum(truth, parts, grid, band)
    generator = torch.Generator().manual_seed(0)
    errors = []
    for batch in parts:
        images = BandImages.of(batch, grid, band, sigma2)
        covariance = rotation_covariance(truth, images, batch.rotations.double(), batch.shift_A.double(),
                                         math.radians(0.25), 0.25 * grid.pixel_A)
        normal = torch.randn(len(batch), draws, 3, generator=generator, dtype=torch.float64)
        errors.append(torch.einsum("bij,bsj->bsi", torch.linalg.cholesky(covariance), normal).norm(dim=-1).reshape(-1))
    return np.degrees(torch.cat(errors).numpy())


def summary(errors_deg: np.ndarray) -> str:
    """The median of rotation errors (degrees), their quartiles and 90th percentile, and the
    share beyond 10°."""
    return (f"median {np.median(errors_deg):.2f}° (25/75/90 %: "
            + ", ".join(f"{np.percentile(errors_deg, q):.2f}°" for q in (25, 75, 90))
            + f"), {np.mean(errors_deg > 10):.1%} beyond 10°")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--star", default="particles.star")
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    degrees = bound_deg(args.workdir, args.star, args.particles, args.draws)
    print(f"{len(degrees) // args.draws} particles of {args.workdir / args.star}")
    print(f"Cramér–Rao bound, rotation error: {summary(degrees)}")


if __name__ == "__main__":
    main()
