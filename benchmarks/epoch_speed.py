"""Seconds per epoch and peak memory of known-pose SGD, per method.

    python benchmarks/epoch_speed.py [--particles 10000] [--box 64] [--batch-size 1000] [--epochs 3]
                                     [--store memory|disk] [--compile auto|0|1]

Simulates a dataset (1UBQ) and times epochs of each method on one half-set-sized problem (all
the particles) in this process, after the first pass (which reads the images into the store)
and a warm-up epoch (which includes any compilation). An Algorithm 1 epoch = per batch one
forward of the map and one of the probe, one scatter of gradient and H·z, and one forward of
the step direction for the Armijo rule. Peak memory is this process's maximum resident set.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
from importlib import resources
from pathlib import Path

import torch

from cryosgd.analysis.convergence import start
from cryosgd.data.particles import read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.fourier.grids import FourierGrid
from cryosgd.recon.halves import HalfSet
from cryosgd.recon.known_pose import run_epoch
from cryosgd.recon.settings import ReconstructionSettings
from cryosgd.sim.simulate import SimulationSettings, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=10000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["algorithm1", "sgd", "exact-diag", "pcg"])
    parser.add_argument("--store", default="memory", choices=("memory", "disk"))
    parser.add_argument("--compile", default=None, choices=("auto", "0", "1"), help="CRYOSGD_COMPILE for this run")
    args = parser.parse_args()
    if args.compile is not None:
        os.environ["CRYOSGD_COMPILE"] = args.compile
    root = Path(tempfile.mkdtemp(prefix="epoch_speed_"))
    with resources.as_file(resources.files("cryosgd") / "data" / "1ubq.pdb") as pdb:
        star = simulate(pdb, root, SimulationSettings(n_particles=args.particles, snr=0.01, bfactor_A2=50),
                        box_px=args.box, pixel_A=96.0 / args.box)
    table = read_particles(star)
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    print(f"{args.particles} particles, box {args.box}, batch {args.batch_size}, images in {args.store}, "
          f"{torch.get_num_threads()} threads, CRYOSGD_COMPILE={os.environ.get('CRYOSGD_COMPILE', 'auto')}")
    print(f"{'method':<12}{'s/epoch (median)':>18}{'peak RSS GB':>13}")
    for method in args.methods:
        settings = ReconstructionSettings(method=method, batch_size=args.batch_size, store=args.store)
        half = HalfSet(table, stack, grid, settings, half=1)
        state, _ = run_epoch(half, start(half), 1)  # warm-up, includes any compilation
        seconds = []
        for epoch in range(2, args.epochs + 2):
            state, metrics = run_epoch(half, state, epoch)
            seconds.append(metrics["seconds"])
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(f"{method:<12}{statistics.median(seconds):>18.2f}{peak_gb:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
