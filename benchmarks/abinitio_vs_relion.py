"""Ab initio and auto: cryosgd against RELION 3.1's SGD initial model, on relion_project data.

    python benchmarks/abinitio_vs_relion.py [--particles 10000] [--box 64] [--pixel 3.0] [--snr 0.05]
                                            [--model ubq12] [--seeds 0 1 2 3 4] [--auto] [--relion]
                                            [--relion-minutes 20] [--diameter Å] [--workdir DIR]

The dataset is the refinement benchmark's (benchmarks/datasets.py; poses removed). For each
seed, ``cryosgd abinitio``: wall time and the median rotation error of its poses against the
true ones after the best global rotation and hand (``cryosgd.pose.compare``); a seed succeeds
when that is ≤ 5°. ``--auto``: ``cryosgd auto`` once (seed 0): wall time, final resolution,
median pose error, and the FSC of its map brought into the truth's frame against the truth
(mean over shells n/4 … n/2), beside the known-pose reconstruction's (``cryosgd reconstruct``
with the true poses). ``--relion``: ``relion_refine --denovo_3dref --sgd`` with RELION 3.1's
GUI defaults for an initial model, capped at ``--relion-minutes``.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import affine_transform

from cryosgd.conventions import euler_to_matrix
from cryosgd.data.particles import read_particles
from cryosgd.fourier.fsc import fsc
from cryosgd.io.mrc import read_map
from cryosgd.pose.compare import pose_errors

sys.path.insert(0, str(Path(__file__).parent))
from datasets import dataset_parser, high_shell_mean, make_dataset, matching_rows, run_measured  # noqa: E402
from refine_vs_relion import prepare  # noqa: E402


def errors(true_star: Path, found_star: Path):
    true, found = read_particles(true_star), read_particles(found_star)
    index = matching_rows(true, found)
    return pose_errors(euler_to_matrix(torch.tensor(true.angles_deg[index])),
                       euler_to_matrix(torch.tensor(found.angles_deg)))


def aligned(volume: np.ndarray, rotation: torch.Tensor, mirrored: bool) -> np.ndarray:
    """The map in the truth's frame (see tests/test_abinitio.py): the found map at Qᵀ r, mirrored,
    by cubic B-spline interpolation (linear interpolation would damp the outer shells)."""
    n = volume.shape[0]
    m = rotation.numpy().T @ (np.diag([1.0, 1.0, -1.0]) if mirrored else np.eye(3))
    reverse = np.eye(3)[::-1]
    matrix = reverse @ m @ reverse
    centre = np.full(3, n // 2)
    return affine_transform(volume.astype(np.float64), matrix, offset=centre - matrix @ centre, order=3)


def relion_sgd_command(diameter_A: float) -> list[str]:
    return ["relion_refine", "--o", "relion_sgd/run", "--i", "particles_noposes.star", "--denovo_3dref", "--sgd",
            "--sgd_ini_iter", "50", "--sgd_inbetween_iter", "200", "--sgd_fin_iter", "50", "--sgd_write_iter", "20",
            "--sgd_ini_resol", "35", "--sgd_fin_resol", "15", "--sgd_ini_subset", "100", "--sgd_fin_subset", "500",
            "--ctf", "--K", "1", "--sym", "C1", "--flatten_solvent", "--zero_mask", "--dont_combine_weights_via_disc",
            "--pool", "3", "--pad", "1", "--particle_diameter", f"{diameter_A:.0f}", "--oversampling", "1",
            "--healpix_order", "1", "--offset_range", "6", "--offset_step", "4", "--j", "2"]


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--auto", action="store_true")
    parser.add_argument("--relion", action="store_true")
    parser.add_argument("--relion-minutes", type=float, default=20.0)
    parser.add_argument("--diameter", type=float, default=None, help="particle diameter (Å), default 0.8 box")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="abinitio_bench_"))
    star = make_dataset(root, args.particles, args.box, args.pixel, args.snr, model=args.model)
    prepare(root, star, args.pixel, 0)
    diameter = args.diameter or 0.8 * args.box * args.pixel
    mask = ["--particle-diameter", f"{diameter:.0f}"]
    truth, _ = read_map(root / "truth.mrc")
    n = args.box
    print(f"dataset: {args.particles} particles of {args.model}, box {args.box}, {args.pixel} Å, SNR {args.snr} "
          f"in {root}", flush=True)
    results = []
    for seed in args.seeds:
        seconds, peak, _ = run_measured([sys.executable, "-m", "cryosgd", "abinitio", "particles_noposes.star", "-o",
                                         f"abinitio_{seed}", "--seed", str(seed), "--force", *mask], root)
        e = errors(star, root / f"abinitio_{seed}" / "particles.star")
        results.append((seed, seconds, peak, e.median_deg, e.mirrored))
        print(f"abinitio seed {seed}: {seconds:.0f} s, peak {peak:.2f} GB, median error {e.median_deg:.2f}° "
              f"({'mirrored' if e.mirrored else 'same hand'}) → {'success' if e.median_deg <= 5 else 'failure'}",
              flush=True)
    if results:
        successes = sum(r[3] <= 5 for r in results)
        print(f"abinitio: {successes} of {len(results)} seeds succeed; wall time median "
              f"{np.median([r[1] for r in results]):.0f} s, max {max(r[1] for r in results):.0f} s")
    if args.auto:
        seconds, peak, _ = run_measured([sys.executable, "-m", "cryosgd", "reconstruct", star.name, "-o", "known",
                                         "--force"], root)
        known = fsc(read_map(root / "known" / "map.mrc")[0], truth, args.pixel).fsc
        seconds, peak, _ = run_measured([sys.executable, "-m", "cryosgd", "auto", "particles_noposes.star", "-o",
                                         "auto", "--force", *mask], root)
        e = errors(star, root / "auto" / "particles.star")
        stages = json.loads((root / "auto" / "auto.json").read_text())
        refined = aligned(read_map(root / "auto" / "refine" / "map.mrc")[0], e.rotation, e.mirrored)
        ours = fsc(refined, truth, args.pixel).fsc
        print(f"auto: {seconds:.0f} s (" + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in stages.items())
              + f"), peak {peak:.2f} GB; resolution {stages['postprocess']['resolution_A']:.2f} Å (masked, corrected), "
              f"median pose error {e.median_deg:.2f}°; FSC to the truth (n/4..n/2) {high_shell_mean(ours, n):.3f}"
              f" against the known-pose reconstruction's {high_shell_mean(known, n):.3f}")
    if args.relion:
        (root / "relion_sgd").mkdir(exist_ok=True)
        seconds, peak, finished = run_measured(relion_sgd_command(diameter), root, timeout_s=60 * args.relion_minutes)
        done = sorted((root / "relion_sgd").glob("run_it*_data.star"))
        if not done:
            print(f"relion_refine --sgd: nothing written in {seconds:.0f} s")
            return
        it = re.search(r"run_it(\d+)_", done[-1].name).group(1)
        e = errors(star, done[-1])
        print(f"relion_refine --denovo_3dref --sgd: {seconds:.0f} s ({'finished' if finished else 'capped'} at "
              f"iteration {it}), peak {peak:.2f} GB, median error {e.median_deg:.2f}° "
              f"({'mirrored' if e.mirrored else 'same hand'})")


if __name__ == "__main__":
    main()
