"""Seconds per epoch and peak memory of known-pose SGD, per method.

    python benchmarks/epoch_speed.py [--particles 10000] [--box 64] [--batch-size 1000] [--epochs 3]

Simulates a dataset (1UBQ, memory-mapped MRCS) and times epochs of each method on one
half-set-sized problem in this process (after a warm-up epoch that includes torch.compile).
An Algorithm 1 epoch = per batch one loss and gradient, one Hutchinson H·z, and the Armijo
backtracking losses, plus the full-data loss at the end. Peak memory is this process's
maximum resident set, which includes the memory-mapped pages of the stack it touched.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
from importlib import resources
from pathlib import Path

from cryosgd.data.particles import read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.fourier.grids import FourierGrid
from cryosgd.sim.simulate import SimulationSettings, simulate
from cryosgd.recon.known_pose import HalfSet, ReconstructionSettings, init_half, run_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=10000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["algorithm1", "sgd", "exact-diag", "pcg"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="epoch_speed_"))
    with resources.as_file(resources.files("cryosgd") / "data" / "1ubq.pdb") as pdb:
        star = simulate(pdb, root, SimulationSettings(n_particles=args.particles, snr=0.01, bfactor_A2=50),
                        box_px=args.box, pixel_A=96.0 / args.box)
    table = read_particles(star)
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    print(f"{args.particles} particles, box {args.box}, batch {args.batch_size}")
    print(f"{'method':<12}{'s/epoch (median)':>18}{'peak RSS GB':>13}")
    for method in args.methods:
        settings = ReconstructionSettings(method=method, batch_size=args.batch_size)
        half = HalfSet(table, stack, grid, settings, half=1)
        state = run_epoch(half, init_half(half), 0)  # warm-up, includes compilation
        seconds = []
        for epoch in range(1, args.epochs + 1):
            state = run_epoch(half, state, epoch)
            seconds.append(state["metrics"]["seconds"])
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(f"{method:<12}{statistics.median(seconds):>18.2f}{peak_gb:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
