"""Known-pose reconstruction: cryosgd's methods against relion_reconstruct, on relion_project data.

    python benchmarks/known_pose_vs_relion.py [--particles 20000] [--box 128] [--snr 0.01]
                                              [--runs algorithm1:0 algorithm1 pcg:1 ...] [--workdir DIR]

Makes the ground truth from the shipped 1UBQ model (B 50 Å²), noise-free projections with
``relion_project --ctf`` to measure the signal variance, then the dataset with
``relion_project --ctf --add_noise --white_noise σ`` at the requested SNR. It runs
``relion_reconstruct --ctf`` and ``cryosgd reconstruct --method M`` on the same STAR file, each as
its own process; a run ``METHOD:E`` is ``cryosgd reconstruct --method METHOD --epochs E``
(``algorithm1:0``, the one-pass map, is the first pass of the default run, so its time is when
the default run's map reaches that quality). A ``--workdir`` that holds a dataset is reused. The table gives wall time, peak resident memory, and the FSC of each map
against the truth: the mean over the shells from twice the Nyquist period (n/4) to Nyquist
(n/2), and selected shells. ``--convergence`` adds, per SGD method, the epochs each needs
to reach FSC > 0.9 against the converged map (60 PCG iterations) in the outer shells.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from cryosgd.fourier.fsc import fsc
from cryosgd.data.particles import read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.io.mrc import read_map, write_map
from cryosgd.sim.simulate import SimulationSettings, model_to_map, blur, random_table


def run_measured(args: list[str], cwd: Path) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak resident memory in GB) of that process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024**2


def make_dataset(root: Path, n: int, box: int, pixel_A: float, snr: float, seed: int) -> Path:
    if (root / "particles.star").exists() and (root / "truth.mrc").exists():
        return root / "particles.star"
    with resources.as_file(resources.files("cryosgd") / "data" / "1ubq.pdb") as pdb:
        truth = blur(model_to_map(pdb, box, pixel_A), pixel_A, 50.0)
    write_map(root / "truth.mrc", truth, pixel_A)
    table = random_table(SimulationSettings(n_particles=n, seed=seed), pixel_A, box)
    write_particles(root / "poses.star", table)
    write_particles(root / "probe.star", table.subset(np.arange(min(n, 300))))
    run_measured(["relion_project", "--i", "truth.mrc", "--ang", "probe.star", "--o", "clean", "--ctf"], root)
    clean = ImageStack(read_particles(root / "clean.star")).read(np.arange(min(n, 300)))
    sigma = float(np.sqrt(clean.var(axis=(1, 2)).mean() / snr))
    run_measured(["relion_project", "--i", "truth.mrc", "--ang", "poses.star", "--o", "particles", "--ctf",
                  "--add_noise", "--white_noise", f"{sigma}"], root)
    return root / "particles.star"


def fsc_row(path: Path, truth: np.ndarray, pixel_A: float) -> tuple[float, np.ndarray]:
    curve = fsc(read_map(path)[0], truth, pixel_A).fsc
    n = truth.shape[0]
    return float(np.nanmean(curve[n // 4: n // 2 + 1])), curve


def convergence_epochs(star: Path, box: int, methods: list[str], epochs: int, threshold: float = 0.9):
    """Epochs each SGD method needs for FSC > threshold against the converged map in the outer shells."""

    from cryosgd.analysis.convergence import converged, epochs_to, trace
    from cryosgd.fourier.grids import FourierGrid
    from cryosgd.recon.known_pose import HalfSet, ReconstructionSettings

    table = read_particles(star)
    stack = ImageStack(table)
    half_index = np.arange(0, len(table), 2)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)

    def half_for(method: str) -> HalfSet:
        settings = ReconstructionSettings(method=method, prior="none", batch_size=1000)
        return HalfSet(table.subset(half_index), stack.subset(half_index), grid, settings, half=1)

    reference = converged(half_for("pcg"), 60)
    outer = slice(box // 4, box // 2 - 1)
    result = {}
    for method in methods:
        curves = trace(half_for(method), reference, epochs).fsc
        result[method] = (epochs_to(curves, threshold, outer), float(np.min(curves[-1, outer])))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=20000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--pixel", type=float, default=1.0)
    parser.add_argument("--snr", type=float, default=0.01)
    parser.add_argument("--runs", nargs="+", default=["algorithm1:0", "algorithm1", "pcg:1", "pcg:5", "exact-diag",
                                                           "sgd", "cg:5"], help="METHOD[:EPOCHS] (default epochs 3)")
    parser.add_argument("--convergence", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="known_pose_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    star = make_dataset(root, args.particles, args.box, args.pixel, args.snr, args.seed)
    print(f"dataset: {args.particles} particles, box {args.box}, {args.pixel} Å, SNR {args.snr} "
          f"(relion_project, {time.perf_counter() - start:.0f} s) in {root}")
    truth, _ = read_map(root / "truth.mrc")
    rows = [("relion_reconstruct", *run_measured(["relion_reconstruct", "--i", star.name, "--o", "relion.mrc",
                                                  "--ctf"], root), root / "relion.mrc")]
    for run in args.runs:
        method, _, epochs = run.partition(":")
        out = root / f"cryosgd_{method}_{epochs or 3}"
        cmd = [sys.executable, "-m", "cryosgd", "reconstruct", star.name, "-o", out.name, "--method", method,
               "--epochs", epochs or "3", "--seed", str(args.seed)]
        rows.append((f"cryosgd {method} {epochs or 3} ep", *run_measured(cmd, root), out / "map.mrc"))
    n = args.box
    shells = [n // 8, n // 4, 3 * n // 8, n // 2 - 2]
    print(f"\n{'program':<22}{'wall s':>8}{'peak GB':>9}{'FSC mean n/4..n/2':>19}"
          + "".join(f"{'shell ' + str(s):>10}" for s in shells) + f"{'time vs RELION':>16}")
    relion_seconds = rows[0][1]
    for name, seconds, peak, path in rows:
        mean, curve = fsc_row(path, truth, args.pixel)
        print(f"{name:<22}{seconds:>8.1f}{peak:>9.2f}{mean:>19.3f}" + "".join(f"{curve[s]:>10.3f}" for s in shells)
              + f"{seconds / relion_seconds:>16.2f}")
    if args.convergence:
        print(f"\nepochs to FSC > 0.9 against the converged map, shells {n // 4}..{n // 2 - 2} (prior none):")
        sgd_methods = sorted({r.partition(":")[0] for r in args.runs} - {"cg", "pcg"})
        for method, (reached, worst) in convergence_epochs(star, n, sgd_methods, 10).items():
            print(f"  {method:<12} {'> 10' if reached is None else reached:>5}   (min FSC after 10 epochs {worst:.3f})")


if __name__ == "__main__":
    main()
