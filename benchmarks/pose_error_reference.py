"""How close a pose search comes to the true poses with a given reference: the best that a
gold-standard refinement can do on a dataset.

    python benchmarks/pose_error_reference.py --workdir DIR [--star particles.star] [--known known]
                                              [--particles 2000] [--diameter D]

``DIR`` is a refine_vs_relion.py workdir: ``particles.star`` (images and true poses),
``truth.mrc``, and ``KNOWN/half1.mrc``, ``KNOWN/half2.mrc``: ``cryosgd reconstruct`` of the
same particles at their true poses (``refine_vs_relion.py --runs known``), in the half-sets that
``cryosgd refine`` uses too. For the first ``--particles`` / 2 particles of each half, the local
search of ``cryosgd refine`` (:func:`cryosgd.pose.search.local_search`: three rounds of four
levels from 2°, on the whole band, σ² per shell from the residuals at the true poses) starts at
the true pose and scores against each of these references, masked by the particle's soft
sphere and oversampled twice:

- ``truth``: the map itself;
- ``other half``: the known-pose map of the other half-set, the best reference a gold-standard
  refinement can hold: reconstructed from the true poses, and without the particle;
- ``own half``: the known-pose map of the particle's own half-set, which holds the particle's
  own noise at its true pose.

Each row is optimistic, since a search from unknown poses starts farther away: the second is
what a gold-standard refinement can at best reach on these data. The third shows how strongly a
map built with a particle at some pose draws the particle back to that pose; this is why a
refinement started at the true poses (``refine_vs_relion.py --runs oracle``) ends closer to them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.maps import soft_sphere, support_radius_px
from cryosgd.io.mrc import read_map
from cryosgd.pose.search import BandImages, Candidates, local_search
from cryosgd.pose.so3 import geodesic_distance_deg
from cryosgd.recon.settings import mask_radius_px
from cryosgd.sim.project import oversampled_ft

from pose_error_bound import Truth, batches, residual_spectrum

_ROUNDS, _LEVELS, _STEP_DEG = 3, 4, 2.0  # the local search: rounds of levels from this step
_PAD = 2  # the references' oversampling


def reference_ft(volume: np.ndarray, mask: Tensor) -> Tensor:
    """A real-space map, masked, as the ``_PAD`` times oversampled half-grid a search slices."""
    return oversampled_ft(torch.as_tensor(volume, dtype=torch.float64) * mask, _PAD, "trilinear").to(torch.complex64)


def searched_errors(reference: Tensor, parts: list, grid: FourierGrid, sigma2: Tensor, radius_A: float) -> Tensor:
    """``(N,)`` rotation errors (degrees) after the local search from the true poses of ``parts``."""
    errors = []
    for batch in parts:
        images = BandImages.of(batch, grid, grid.box_px / 2 - 1, sigma2)
        images = BandImages(images.images_ft.to(torch.complex64), images.ctf.float(), images.weight.float(),
                            _PAD * images.freq_px.float(), images.freq_invA.float())  # indices on the finer grid
        true = batch.rotations.float()
        poses = Candidates(true[:, None], batch.shift_A.float()[:, None], torch.zeros(len(batch), 1))
        for _ in range(_ROUNDS):
            poses, _ = local_search(reference, images, poses, step_deg=_STEP_DEG, step_A=0.25 * grid.pixel_A,
                                    levels=_LEVELS, radius_A=radius_A)
        errors.append(geodesic_distance_deg(poses.rotations[:, 0].double(), true.double()))
    return torch.cat(errors)


def reference_errors(root: Path, star: str = "particles.star", known: str = "known", particles: int = 2000,
                     diameter_A: float | None = None) -> dict[str, np.ndarray]:
    """Rotation errors (degrees) of the first ``particles`` / 2 of each half of ``root / star``
    after local searches from their true poses against each reference (module docstring)."""
    torch.set_grad_enabled(False)
    volume, _ = read_map(root / "truth.mrc")
    halves = {h: batches(root / star, particles // 2, half=h) for h in (1, 2)}
    grid = halves[1][1]
    mask = soft_sphere(grid.box_px, mask_radius_px(diameter_A, grid), edge_px=max(2.0, grid.box_px / 32))
    radius_A = support_radius_px(mask) * grid.pixel_A
    sigma2, _ = residual_spectrum(Truth(volume), halves[1][0] + halves[2][0], grid, grid.box_px / 2 - 1)
    known_maps = {h: reference_ft(read_map(root / known / f"half{h}.mrc")[0], mask) for h in (1, 2)}
    references = {"truth": lambda h: reference_ft(volume, mask), "other half": lambda h: known_maps[3 - h],
                  "own half": lambda h: known_maps[h]}
    return {name: torch.cat([searched_errors(reference(h), parts, grid, sigma2, radius_A)
                             for h, (parts, grid) in halves.items()]).numpy()
            for name, reference in references.items()}


def summary(errors: np.ndarray) -> str:
    return (f"median {np.median(errors):.2f}° (25/75/90 %: "
            + ", ".join(f"{np.percentile(errors, q):.2f}°" for q in (25, 75, 90)) + f"), {np.mean(errors > 10):.1%} beyond 10°")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--star", default="particles.star")
    parser.add_argument("--known", default="known", help="the known-pose reconstruction's folder in --workdir")
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--diameter", type=float, default=None, help="particle diameter (Å), default 0.8 box")
    args = parser.parse_args()
    errors = reference_errors(args.workdir, args.star, args.known, args.particles, args.diameter)
    for name, values in errors.items():
        print(f"from the true poses, against the {name}: {summary(values)}  ({len(values)} particles)")


if __name__ == "__main__":
    main()
