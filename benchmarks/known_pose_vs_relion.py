"""Known-pose reconstruction: cryosgd against relion_reconstruct, on relion_project data.

    python benchmarks/known_pose_vs_relion.py [--particles 10000] [--box 64] [--pixel 1.5] [--snr 0.05]
                                              [--runs default algorithm1:0 pcg:1 ...] [--repeats 3]
                                              [--workdir DIR] [--convergence]

The dataset (benchmarks/datasets.py: 1UBQ, B 50 Å², relion_project --ctf with white noise at
the SNR) is made once per work folder and reused. ``relion_reconstruct --ctf`` and
``cryosgd reconstruct`` run on the same STAR file, each as its own process (start-up
included), ``--repeats`` times in turn; the table gives the median wall time, the peak
resident memory, and the FSC of each map against the truth: the mean over the shells from
twice the Nyquist period (n/4) to Nyquist (n/2), and selected shells. A run ``default`` is
``cryosgd reconstruct`` with no options; ``METHOD:E`` adds ``--method METHOD --epochs E``.
``--convergence`` adds, per SGD method, the epochs each needs to reach FSC > 0.9 against the
converged map (60 PCG iterations) in the outer shells.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cryosgd.data.particles import read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.fourier.fsc import fsc
from cryosgd.io.mrc import read_map

sys.path.insert(0, str(Path(__file__).parent))
from datasets import dataset_parser, make_dataset, run_measured  # noqa: E402


def fsc_row(path: Path, truth: np.ndarray, pixel_A: float) -> tuple[float, np.ndarray]:
    curve = fsc(read_map(path)[0], truth, pixel_A).fsc
    n = truth.shape[0]
    return float(np.nanmean(curve[n // 4: n // 2 + 1])), curve


def convergence_epochs(star: Path, box: int, methods: list[str], epochs: int, threshold: float = 0.9):
    """Epochs each SGD method needs for FSC > threshold against the converged map in the outer shells."""
    from cryosgd.analysis.convergence import converged, epochs_to, trace
    from cryosgd.fourier.grids import FourierGrid
    from cryosgd.recon.halves import HalfSet
    from cryosgd.recon.settings import ReconstructionSettings

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


def _command(run: str, star: Path, seed: int) -> tuple[str, list[str], str]:
    """(label, command, output folder) of a run ``default`` or ``METHOD:EPOCHS``."""
    if run == "relion":
        return "relion_reconstruct", ["relion_reconstruct", "--i", star.name, "--o", "relion.mrc", "--ctf"], "relion.mrc"
    options, label, folder = [], "cryosgd default", "cryosgd_default"
    if run != "default":
        method, _, epochs = run.partition(":")
        options = ["--method", method] + (["--epochs", epochs] if epochs else [])
        label, folder = f"cryosgd {method} {epochs or 'auto'} ep", f"cryosgd_{method}_{epochs or 'auto'}"
    command = [sys.executable, "-m", "cryosgd", "reconstruct", star.name, "-o", folder, "--force", "--seed",
               str(seed), *options]
    return label, command, f"{folder}/map.mrc"


def main() -> None:
    parser = dataset_parser(__doc__, pixel_A=1.5, model="1ubq")
    parser.add_argument("--runs", nargs="+", default=["default"], help="default or METHOD[:EPOCHS]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--convergence", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="known_pose_bench_"))
    start = time.perf_counter()
    star = make_dataset(root, args.particles, args.box, args.pixel, args.snr, args.seed, args.model)
    print(f"dataset: {args.particles} particles, box {args.box}, {args.pixel} Å, SNR {args.snr} "
          f"(relion_project, {time.perf_counter() - start:.0f} s) in {root}")
    truth, _ = read_map(root / "truth.mrc")
    runs = [_command(run, star, args.seed) for run in ["relion", *args.runs]]
    times = {label: [] for label, _, _ in runs}
    peaks = {label: 0.0 for label, _, _ in runs}
    for _ in range(args.repeats):
        for label, command, _ in runs:
            seconds, peak, _ = run_measured(command, root)
            times[label].append(seconds)
            peaks[label] = max(peaks[label], peak)
    n = args.box
    shells = [n // 8, n // 4, 3 * n // 8, n // 2 - 2]
    print(f"\n{'program':<24}{'wall s (median)':>16}{'runs':>32}{'peak GB':>9}{'FSC mean n/4..n/2':>19}"
          + "".join(f"{'shell ' + str(s):>10}" for s in shells) + f"{'time vs RELION':>16}")
    relion_seconds = statistics.median(times["relion_reconstruct"])
    for label, _, output in runs:
        mean, curve = fsc_row(root / output, truth, args.pixel)
        seconds = statistics.median(times[label])
        spread = ", ".join(f"{t:.1f}" for t in times[label])
        print(f"{label:<24}{seconds:>16.1f}  {spread:>30}{peaks[label]:>9.2f}{mean:>19.3f}"
              + "".join(f"{curve[s]:>10.3f}" for s in shells) + f"{seconds / relion_seconds:>16.2f}")
    if args.convergence:
        print(f"\nepochs to FSC > 0.9 against the converged map, shells {n // 4}..{n // 2 - 2} (prior none):")
        methods = sorted({r.partition(":")[0] for r in args.runs} - {"cg", "pcg", "default"}) or ["algorithm1"]
        for method, (reached, worst) in convergence_epochs(star, n, methods, 10).items():
            print(f"  {method:<12} {'> 10' if reached is None else reached:>5}   (min FSC after 10 epochs {worst:.3f})")


if __name__ == "__main__":
    main()
