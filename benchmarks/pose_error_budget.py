"""What pose accuracy the FSC-to-truth target needs: known-pose maps from perturbed poses.

    python benchmarks/pose_error_budget.py --workdir DIR [--refined refine_em]
                                           [--medians 1.5 2 2.5 3] [--fix-above 10 5]

``DIR`` is a refine_vs_relion.py workdir: ``particles.star`` (the true poses), ``truth.mrc``
and a refinement's ``REFINED/particles.star``. Each row reconstructs the particles with
``cryosgd reconstruct`` (the known-pose command, the refinement's half-sets) at:

- the true poses turned by isotropic Gaussian rotation errors whose median is the given
  angle (per-axis σ = median / 1.54: the median of a χ with 3 degrees of freedom is 1.54);
- the refinement's poses with the true ones (in the refinement's frame) for the particles
  more than the given angle off, and for all of them;

and prints the FSC of the joint map against the truth (the mean over shells n/4 … n/2, as
refine_vs_relion.py): how far the map is from the known-pose ceiling because of which errors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cryosgd.conventions import euler_to_matrix, matrix_to_euler
from cryosgd.data.particles import ParticleTable, read_particles, write_particles
from cryosgd.fourier.fsc import fsc
from cryosgd.io.mrc import read_map
from cryosgd.pose.compare import pose_errors
from cryosgd.pose.so3 import exp_map

sys.path.insert(0, str(Path(__file__).parent))
from datasets import high_shell_mean, matching_rows, run_measured  # noqa: E402


def fsc_to_truth(root: Path, table: ParticleTable, truth: np.ndarray, pixel_A: float) -> float:
    """The FSC to the truth of the known-pose map of ``table`` (reconstructed in ``root``)."""
    with tempfile.TemporaryDirectory(dir=root) as work:
        star = Path(work) / "poses.star"
        write_particles(star, table)
        run_measured([sys.executable, "-m", "cryosgd", "reconstruct", str(star), "-o", str(Path(work) / "map")], root)
        halves = [read_map(Path(work) / "map" / f"half{h}.mrc")[0] for h in (1, 2)]
    return high_shell_mean(fsc(0.5 * (halves[0] + halves[1]), truth, pixel_A).fsc, truth.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--refined", default="refine_em")
    parser.add_argument("--medians", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--fix-above", type=float, nargs="+", default=[10.0, 5.0])
    args = parser.parse_args()
    root = args.workdir
    ours, true = read_particles(root / args.refined / "particles.star"), read_particles(root / "particles.star")
    index = matching_rows(true, ours)
    true_rotations = euler_to_matrix(torch.tensor(true.angles_deg[index]))
    found = pose_errors(true_rotations, euler_to_matrix(torch.tensor(ours.angles_deg)), hand=False)
    errors = found.errors_deg.numpy()
    truth, pixel_A = read_map(root / "truth.mrc")
    print(f"{len(ours)} particles; the refinement's median error {np.median(errors):.2f}°")
    print(f"{'poses':<52}{'share':>8}{'FSC n/4..n/2':>14}")
    generator = torch.Generator().manual_seed(0)
    for median in args.medians:
        sigma = np.radians(median / 1.54)
        turned = true_rotations @ exp_map(torch.randn(len(index), 3, generator=generator, dtype=torch.float64) * sigma)
        table = replace(ours, angles_deg=matrix_to_euler(turned).numpy(), shift_A=true.shift_A[index])
        print(f"{f'true, Gaussian errors of median {median:g}°':<52}{1:>8.3f}"
              f"{fsc_to_truth(root, table, truth, pixel_A):>14.3f}", flush=True)
    in_our_frame = matrix_to_euler(true_rotations @ found.rotation).numpy()
    for above in [*args.fix_above, -1.0]:
        fix = errors > above
        angles, shifts = ours.angles_deg.copy(), ours.shift_A.copy()
        angles[fix], shifts[fix] = in_our_frame[fix], true.shift_A[index][fix]
        name = "true (all)" if above < 0 else f"refined, true for those > {above:g}° off"
        print(f"{name:<52}{fix.mean():>8.3f}"
              f"{fsc_to_truth(root, replace(ours, angles_deg=angles, shift_A=shifts), truth, pixel_A):>14.3f}",
              flush=True)
    print(f"{'refined':<52}{0:>8.3f}{fsc_to_truth(root, ours, truth, pixel_A):>14.3f}")


if __name__ == "__main__":
    main()
