"""What the reference costs a pose search: local searches from the true poses against the truth
and against known-pose half maps.

    python benchmarks/pose_error_reference.py --workdir DIR [--star particles.star] [--known known]
                                              [--particles 2000] [--diameter D]

``DIR`` is a refine_vs_relion.py workdir: ``particles.star`` (images and true poses),
``truth.mrc``, and ``KNOWN/half1.mrc``, ``KNOWN/half2.mrc``: ``cryosgd reconstruct`` of the
same particles at their true poses (``refine_vs_relion.py --runs known``), in the half-sets
that ``cryosgd refine`` uses too. For the first ``--particles`` / 2 particles of each half,
cryosgd's local search (:func:`cryosgd.pose.search.local_search`, run here as ``_ROUNDS``
rounds of ``_LEVELS`` levels from ``_STEP_DEG`` on the whole band, σ² per shell from the
residuals at the true poses) starts at the true pose and scores against each of these
references, masked by ``cryosgd refine``'s default soft sphere and oversampled twice:

- ``truth``: the map itself;
- ``other half``: the known-pose map of the other half-set: reconstructed from the true poses,
  without the particle;
- ``own half``: the known-pose map of the particle's own half-set, which holds the particle's
  own noise at its true pose.

Against the truth the search ends above the Cramér–Rao bound (``pose_error_bound.py``): the
log-likelihood is rippled by the noise, and the search stops in the maximum nearest its start.
The difference between the first two rows is what an estimated reference costs this search.
A refinement from unknown poses holds each particle in its references where it placed it, not
at its true pose, so the second row, whose reference holds no pull towards the true poses, is
the comparison for it; an optimistic one, since the search starts at the true poses. The third
row shows how strongly a map made with a particle at some pose draws the particle back to that
pose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.maps import support_radius_px
from cryosgd.io.mrc import read_map
from cryosgd.pose.search import BandImages, Candidates, local_search
from cryosgd.pose.so3 import geodesic_distance_deg
from cryosgd.recon.refine import sphere_mask
from cryosgd.sim.project import oversampled_ft

sys.path.insert(0, str(Path(__file__).parent))
from pose_error_bound import Truth, batches, residual_spectrum, summary  # noqa: E402

_ROUNDS, _LEVELS, _STEP_DEG = 3, 4, 2.0  # box 64: the median moves 0.12–0.15° from 1 round to 3, 0.01° from 3 to 6
_STEP_PX = 0.25  # the origins' first step (pixels)
_PAD = 2  # the references' oversampling


def reference_ft(volume: np.ndarray, mask: Tensor) -> Tensor:
    """``(2n, 2n, n + 1)`` complex64: the rfft half-grid of a real-space map ``(n, n, n)``
    [z, y, x] times ``mask``, gridding-corrected and zero-padded to ``_PAD`` times its box
    (:func:`cryosgd.sim.project.oversampled_ft`), which a search slices at the image frequencies
    (Fourier-index units) times ``_PAD``."""
    return oversampled_ft(torch.as_tensor(volume, dtype=torch.float64) * mask, _PAD, "trilinear").to(torch.complex64)


def searched_errors(reference: Tensor, parts: list, grid: FourierGrid, sigma2: Tensor, radius_A: float) -> Tensor:
    """``(N,)`` rotation errors (degrees: the angle of R_trueᵀ R_found, RELION matrices) after the
    local search from the true pose of every image of ``parts`` (batches), scored against
    ``reference`` (:func:`reference_ft`) on the whole band with the weights m_k/σ²_k of
    ``sigma2 (G, shells)``; ``radius_A`` is the particle's radius."""
    errors = []
    for batch in parts:
        images = BandImages.of(batch, grid, grid.box_px / 2 - 1, sigma2)
        images = BandImages(images.images_ft.to(torch.complex64), images.ctf.float(), images.weight.float(),
                            _PAD * images.freq_px.float(), images.freq_invA.float())
        true = batch.rotations.float()
        poses = Candidates(true[:, None], batch.shift_A.float()[:, None], torch.zeros(len(batch), 1))
        for _ in range(_ROUNDS):
            poses, _ = local_search(reference, images, poses, step_deg=_STEP_DEG, step_A=_STEP_PX * grid.pixel_A,
                                    levels=_LEVELS, radius_A=radius_A)
        errors.append(geodesic_distance_deg(poses.rotations[:, 0].double(), true.double()))
    return torch.cat(errors)


def reference_errors(root: Path, star: str = "particles.star", known: str = "known", particles: int = 2000,
                     diameter_A: float | None = None) -> dict[str, np.ndarray]:
    """Rotation errors (degrees) of the first ``particles`` / 2 of each half of ``root / star``
    after local searches from their true poses against each reference (module docstring)."""
    torch.set_grad_enabled(False)
    paths = [root / "truth.mrc"] + [root / known / f"half{h}.mrc" for h in (1, 2)]
    for path in paths:
        if not path.exists():
            raise SystemExit(f"{path}: not found (run refine_vs_relion.py --runs known first)")
    truth, half1, half2 = (read_map(path)[0] for path in paths)
    (parts1, grid), (parts2, _) = (batches(root / star, particles // 2, half=h) for h in (1, 2))
    halves = {1: parts1, 2: parts2}
    mask = sphere_mask(diameter_A, grid)
    radius_A = support_radius_px(mask) * grid.pixel_A
    sigma2, _ = residual_spectrum(Truth(truth), halves[1] + halves[2], grid, grid.box_px / 2 - 1)
    truth_ft, known_ft = reference_ft(truth, mask), {1: reference_ft(half1, mask), 2: reference_ft(half2, mask)}
    references = {"truth": {1: truth_ft, 2: truth_ft}, "other half": {1: known_ft[2], 2: known_ft[1]},
                  "own half": known_ft}
    return {name: torch.cat([searched_errors(by_half[h], parts, grid, sigma2, radius_A)
                             for h, parts in halves.items()]).numpy()
            for name, by_half in references.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--star", default="particles.star")
    parser.add_argument("--known", default="known", help="the known-pose reconstruction's folder in --workdir")
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--diameter", type=float, default=None, help="particle diameter (Å), default 0.8 box")
    args = parser.parse_args()
    for name, errors in reference_errors(args.workdir, args.star, args.known, args.particles, args.diameter).items():
        print(f"from the true poses, against the {name}: {summary(errors)} ({len(errors)} particles)")


if __name__ == "__main__":
    main()
