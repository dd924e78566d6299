"""Reproduce the paper's findings (PAPER.md §2, §4) on simulated data with known poses.

    python benchmarks/paper/reproduce.py --out paper-results            # reduced size, 2 CPU cores
    python benchmarks/paper/reproduce.py --out paper-results --full     # paper-like sizes (GPU)

(a) κ(R = n/2 − 1) of the nearest-neighbour diag(H) against the grid size, uniform
    orientations, with and without CTF, beside the bound (1+λ)/(p+λ);
(b) the shell mean of diag(H) against 1/(2r);
(c) Hutchinson's relative error ‖D_k − D*‖/‖D*‖ inside the ball against epochs (one probe per
    batch, running mean), with its fitted power law;
(d) per-shell FSC against the converged solution (Jacobi-preconditioned CG) after each epoch
    for plain SGD, SGD with the exact diagonal and Algorithm 1 (the paper's settings: start 0,
    D₀ = 1, prior none, λ = 1e-8), heat maps and the "epochs to FSC > t" table;
(e) Algorithm 1 with other thresholds α, weights β, D₀ = exact diagonal and the one-pass start.

Everything goes to ``--out`` as CSV and PNG, and a summary is printed (docs/reproduction.md).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from cryosgd.analysis.conditioning import exact_hessian_diagonal, hutchinson_estimates
from cryosgd.analysis.convergence import converged, epochs_to, trace
from cryosgd.analysis.hessian import full_grid, kappa_bound, kappa_of_diagonal, radial_profile
from cryosgd.data.particles import read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.fourier.grids import FourierGrid
from cryosgd.sim.simulate import SimulationSettings, random_table, simulate
from cryosgd.recon.known_pose import HalfSet, ReconstructionSettings
from cryosgd.report import save_curves, save_heatmap, write_lines

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def nn_diagonal(n: int, images: int, seed: int, use_ctf: bool, box_A: float = 400.0) -> torch.Tensor:
    """Full-grid NN diag(H) of ``images`` uniform poses (CTF of a typical defocus range)."""
    table = random_table(SimulationSettings(n_particles=images, seed=seed), box_A / n, n)
    grid = FourierGrid.create(n, box_A / n)
    settings = ReconstructionSettings(interp="nearest", batch_size=2000, use_ctf=use_ctf)
    return full_grid(exact_hessian_diagonal(HalfSet(table, None, grid, settings, 0, dtype=torch.float64)))


def part_a_b(out: Path, grids: list[int], images: int, seeds: int) -> dict:
    rows, summary = ["n,R,kappa_no_ctf,kappa_ctf,bound"], {}
    curves = {"no CTF": [], "CTF": []}
    for n in grids:
        r = torch.tensor([n / 2 - 1.0])
        kappas = {name: float(np.median([kappa_of_diagonal(nn_diagonal(n, images, s, name == "CTF"), r)[0]
                                         for s in range(seeds)])) for name in curves}
        bound = float(kappa_bound(r, 1e-8)[0])
        rows.append(f"{n},{n // 2 - 1},{kappas['no CTF']:.5g},{kappas['CTF']:.5g},{bound:.5g}")
        for name in curves:
            curves[name].append(kappas[name])
        summary[n] = {**kappas, "bound": bound}
    write_lines(out / "a_kappa_vs_grid.csv", rows)
    radii = np.array(grids) / 2 - 1
    save_curves(out / "a_kappa_vs_grid.png", radii, {**curves, "bound": [summary[n]["bound"] for n in grids]},
                xlabel="ball radius n/2 − 1 (voxels)", ylabel="κ of diag(H), NN", title="(a) κ vs grid size",
                log=True)
    n = grids[-1]
    mean, _, _ = radial_profile(nn_diagonal(n, images, 0, False))
    shells = np.arange(1, n // 2)
    write_lines(out / "b_shell_mean.csv", ["r,mean_diag,one_over_2r"]
                + [f"{s},{float(mean[s]):.6g},{1 / (2 * s):.6g}" for s in shells])
    save_curves(out / "b_shell_mean.png", shells, {"shell mean diag(H)": mean[1:].numpy(), "1/(2r)": 1 / (2 * shells)},
                xlabel="r (voxels)", ylabel="diag(H)", title="(b) shell mean of diag(H), NN, no CTF", log=True)
    summary["b"] = {int(s): (float(mean[s]), 1 / (2 * s)) for s in (5, 10, 20, n // 2 - 2)}
    return summary


def dataset(out: Path, n: int, particles: int) -> tuple:
    star = out / "data" / "particles.star"
    if not star.exists():
        with resources.as_file(resources.files("cryosgd") / "data" / "1ubq.pdb") as pdb:
            simulate(pdb, out / "data", SimulationSettings(n_particles=particles, snr=0.01, bfactor_A2=50, seed=1),
                     box_px=n, pixel_A=72.0 / n)
    table = read_particles(star)
    return table, ImageStack(table), FourierGrid.create(n, table.pixel_A)


def part_c(out: Path, table, grid: FourierGrid, batch: int, epochs: int) -> dict:
    settings = ReconstructionSettings(batch_size=batch)
    half = HalfSet(table, None, grid, settings, 0, dtype=torch.float64)
    exact = exact_hessian_diagonal(half)
    inside = exact > 1e-6 * exact.max()  # the ball; outside it D* = λ m₃ exactly
    errors = []
    for probes, estimate in enumerate(hutchinson_estimates(half), start=1):
        if probes % half.steps_per_epoch == 0:
            errors.append(float(torch.linalg.norm((estimate - exact)[inside]) / torch.linalg.norm(exact[inside])))
            if len(errors) == epochs:
                break
    e = np.arange(1, epochs + 1)
    slope, intercept = np.polyfit(np.log(e), np.log(errors), 1)
    write_lines(out / "c_hutchinson_error.csv", ["epoch,relative_error"] + [f"{i},{x:.6g}" for i, x in zip(e, errors)])
    save_curves(out / "c_hutchinson_error.png", e, {"‖D_k − D*‖/‖D*‖": errors,
                                                    f"{np.exp(intercept):.3f}/√epochs": np.exp(intercept) / np.sqrt(e)},
                xlabel="epochs", ylabel="relative error", title="(c) Hutchinson estimate of diag(H)", log=True)
    return {"slope": float(slope), "c": float(np.exp(intercept)), "errors": {i: errors[i - 1] for i in sorted({1, min(10, epochs), epochs})}}


def part_d_e(out: Path, table, stack, grid: FourierGrid, batch: int, epochs: int, cg_iterations: int) -> dict:
    paper = ReconstructionSettings(method="algorithm1", batch_size=batch, prior="none", l2=1e-8, shell_ridge=0.0,
                                   d0="one", start="zero")
    runs = {"sgd": replace(paper, method="sgd"), "exact-diag": replace(paper, method="exact-diag"),
            "algorithm1": paper,
            "alg1 α=1e-14": replace(paper, alpha=1e-14), "alg1 α=1e-3": replace(paper, alpha=1e-3),
            "alg1 β=0.5": replace(paper, beta=0.5), "alg1 β=0.99": replace(paper, beta=0.99),
            "alg1 D₀=exact": replace(paper, d0="exact"),
            "alg1 D₀=exact, one-pass start": replace(paper, d0="exact", start="backprojection")}
    half = lambda s, dtype=torch.float32: HalfSet(table, stack, grid, s, 1, dtype=dtype)  # noqa: E731
    start = time.perf_counter()
    reference = converged(half(replace(paper, method="pcg"), torch.float64), cg_iterations).to(torch.complex64)
    summary = {"reference_seconds": time.perf_counter() - start}
    n = grid.work_box_px
    outer = slice(n // 4, n // 2)
    table_rows = ["run," + ",".join(f"t={t}" for t in THRESHOLDS) + ",final_loss,outer_min_fsc"]
    for name, settings in runs.items():
        result = trace(half(settings), reference, epochs)
        tag = name.replace(" ", "_").replace(",", "").replace("=", "").replace("₀", "0")
        write_lines(out / f"d_fsc_{tag}.csv", ["epoch," + ",".join(f"shell{s}" for s in range(result.fsc.shape[1]))]
                    + [f"{e}," + ",".join(f"{v:.4f}" for v in row) for e, row in enumerate(result.fsc)])
        save_heatmap(out / f"d_fsc_{tag}.png", result.fsc[:, 1:n // 2], xlabel="shell", ylabel="epoch",
                     title=f"(d) FSC to the converged map: {name}", first_column=1)
        reached = [epochs_to(result.fsc, t, outer) for t in THRESHOLDS]
        summary[name] = {"epochs_to": dict(zip(THRESHOLDS, reached)), "loss": result.loss[-1],
                         "outer_fsc": [float(result.fsc[e, outer].min()) for e in range(epochs + 1)]}
        table_rows.append(f"{name}," + ",".join("-" if r is None else str(r) for r in reached)
                          + f",{result.loss[-1]:.8g},{summary[name]['outer_fsc'][-1]:.4f}")
        print(f"  {name:<32} epochs to t: {['-' if r is None else r for r in reached]}  "
              f"outer min FSC per epoch {np.round(summary[name]['outer_fsc'], 3).tolist()}", flush=True)
    write_lines(out / "d_epochs_to_fsc.csv", table_rows)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true", help="paper-like sizes (needs a GPU for reasonable time)")
    parser.add_argument("--parts", default="abcde", help="which parts to run (a and b together, d and e together)")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    size = (dict(grids=[32, 64, 96, 128, 192, 256], images=10000, seeds=10, box=192, particles=30000, batch=1000,
                 epochs=10, hutchinson_epochs=100, cg=300) if args.full else
            dict(grids=[16, 32, 48, 64, 96], images=10000, seeds=3, box=40, particles=12000, batch=400,
                 epochs=10, hutchinson_epochs=50, cg=150))
    print(f"sizes: {size}", flush=True)
    start = time.perf_counter()
    summary = {"sizes": size}
    if set("ab") & set(args.parts):
        summary["a_b"] = part_a_b(out, size["grids"], size["images"], size["seeds"])
        print(f"(a, b) done in {time.perf_counter() - start:.0f} s: {summary['a_b']}", flush=True)
    table, stack, grid = dataset(out, size["box"], size["particles"])
    if "c" in args.parts:
        summary["c"] = part_c(out, table, grid, size["batch"], size["hutchinson_epochs"])
        print(f"(c) done in {time.perf_counter() - start:.0f} s: {summary['c']}", flush=True)
    if set("de") & set(args.parts):
        summary["d_e"] = part_d_e(out, table, stack, grid, size["batch"], size["epochs"], size["cg"])
    summary["seconds"] = time.perf_counter() - start
    write_lines(out / "summary.json", [json.dumps(summary, indent=1, default=str)])
    print(f"done in {summary['seconds']:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
