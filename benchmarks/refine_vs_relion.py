"""Refinement with unknown poses: cryosgd refine (em and sgd updates) against RELION 3.1 auto-refine.

    python benchmarks/refine_vs_relion.py [--particles 10000] [--box 64] [--pixel 3.0] [--snr 0.05]
                                          [--model ubq12] [--runs known em sgd relion oracle bound reference
                                                                  relion-local subset-em subset-local]
                                          [--relion-particles 3000] [--relion-minutes 30] [--workdir DIR]

The dataset (benchmarks/datasets.py) is made by relion_project from an atomic model; the poses
are removed (``particles_noposes.star``: no angles, zero origins) and the reference is the
truth low-passed to 30 Å. Each program runs as its own process: ``cryosgd refine --ref ref.mrc``
(``--update em`` and ``sgd``), ``relion_refine_mpi --auto_refine`` (3 ranks on 2 cores, RELION's
GUI defaults: 7.5° start, local searches from 1.8°, ``--firstiter_cc``, ``--ctf_corrected_ref``)
on the first ``--relion-particles`` particles with a time cap (its last finished iteration is
measured), ``cryosgd reconstruct`` with the true poses (the known-pose ceiling) and, with
``--runs oracle``, ``cryosgd refine --local`` from the true poses against the truth itself at
full resolution, and with ``--runs bound`` the Cramér–Rao bound on the rotations
(``pose_error_bound.py``): the pose error the data allow an ideal search, and with ``--runs
reference`` (after ``known``) the errors of local searches from the true poses against the
truth and against the known-pose half maps (``pose_error_reference.py``): the best a
gold-standard refinement can reach on these data. ``--runs relion-local`` starts RELION's
auto-refine at the true poses of the same ``--relion-particles`` (``relion_subset_true.star``),
with local searches from its first iteration (3.75° sampled, RELION's default prior, σ = 3.75°),
and lets it converge: what the reference program reaches on these data when the global
search cannot fail; ``subset-em`` is ``cryosgd refine`` from unknown poses and ``subset-local``
``cryosgd refine --local`` from the true poses, both on those particles with ``ref.mrc``. The table
gives wall time, peak memory (all processes), the half-map resolution (FSC 0.143), the FSC of
the joint map against the truth (mean over shells n/4 … n/2, and the 0.5 resolution), and the
median rotation error against the true poses (after the best global rotation, which removes a
drift of the frame as a whole).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cryosgd.conventions import euler_to_matrix, map_to_ft, ft_to_map
from cryosgd.data.particles import read_particles, write_particles
from cryosgd.fourier.fsc import fsc
from cryosgd.fourier.maps import low_pass
from cryosgd.io.mrc import read_map, write_map
from cryosgd.pose.compare import pose_errors

sys.path.insert(0, str(Path(__file__).parent))
from datasets import dataset_parser, high_shell_mean, make_dataset, matching_rows, run_measured  # noqa: E402
from pose_error_bound import bound_deg  # noqa: E402
from pose_error_reference import reference_errors  # noqa: E402


def prepare(root: Path, star: Path, pixel_A: float, relion_particles: int) -> None:
    """particles_noposes.star, ref.mrc and, unless ``relion_particles`` is 0, the first
    ``relion_particles`` of them without poses (relion_subset.star) and with the true poses
    (relion_subset_true.star)."""
    table = read_particles(star)
    blank = replace(table, angles_deg=None, shift_A=np.zeros_like(table.shift_A))
    write_particles(root / "particles_noposes.star", blank)
    if relion_particles:
        first = np.arange(min(relion_particles, len(table)))
        write_particles(root / "relion_subset.star", blank.subset(first))
        write_particles(root / "relion_subset_true.star", table.subset(first))
    truth, _ = read_map(root / "truth.mrc")
    write_map(root / "ref.mrc", low_pass(torch.as_tensor(truth, dtype=torch.float64), pixel_A, 30.0).numpy(), pixel_A)


def relion_command(out: str, diameter_A: float, from_true_poses: bool = False) -> list[str]:
    """Auto-refine of the subset into folder ``out`` (global searches from 7.5°, the start from
    ``--firstiter_cc``) or, ``from_true_poses``, local searches from 3.75° around the true poses
    (RELION's prior: σ twice the sampled step, 3.75°)."""
    search = (["--i", "relion_subset_true.star", "--healpix_order", "4", "--offset_range", "3", "--offset_step", "1"]
              if from_true_poses else
              ["--i", "relion_subset.star", "--firstiter_cc", "--healpix_order", "2", "--offset_range", "5",
               "--offset_step", "2"])
    return ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", "3", "relion_refine_mpi", "--o", f"{out}/run",
            *search, "--ref", "ref.mrc", "--ini_high", "30", "--auto_refine",
            "--split_random_halves", "--particle_diameter", f"{diameter_A:.0f}", "--ctf", "--ctf_corrected_ref",
            "--flatten_solvent", "--zero_mask", "--oversampling", "1",
            "--auto_local_healpix_order", "4", "--sym", "C1",
            "--low_resol_join_halves", "40", "--norm", "--scale", "--j", "1", "--pad", "2", "--pool", "3",
            "--dont_combine_weights_via_disc"]


def relion_outputs(folder: Path, converged: bool) -> tuple[np.ndarray, np.ndarray, Path, str] | None:
    """The half maps, data STAR and name of RELION's last iteration in ``folder``: the final one
    (``run_half*_class001_unfil.mrc``, ``run_data.star``) when auto-refine ``converged``, else
    the last one finished."""
    if converged:
        names, star, iteration = [f"run_half{h}_class001_unfil.mrc" for h in (1, 2)], "run_data.star", "final"
    else:
        done = sorted(folder.glob("run_it*_half2_class001.mrc"))
        if not done:
            return None
        it = re.search(r"run_it(\d+)_", done[-1].name).group(1)
        names, star, iteration = [f"run_it{it}_half{h}_class001.mrc" for h in (1, 2)], f"run_it{it}_data.star", it
    halves = [read_map(folder / name)[0] for name in names]
    return halves[0], halves[1], folder / star, iteration


def measure(name: str, seconds: float, peak: float, halves, data_star: Path | None, truth: np.ndarray,
            true_star: Path, pixel_A: float, note: str = "") -> str:
    n = truth.shape[0]
    half_map = fsc(halves[0], halves[1], pixel_A)
    joint = fsc(0.5 * (halves[0] + halves[1]), truth, pixel_A)
    error = ""
    if data_star is not None:
        true, found = read_particles(true_star), read_particles(data_star)
        index = matching_rows(true, found)
        e = pose_errors(euler_to_matrix(torch.tensor(true.angles_deg[index])),
                        euler_to_matrix(torch.tensor(found.angles_deg)), hand=False)
        error = f"{e.median_deg:.2f}"
    return (f"{name:<26}{seconds:>9.0f}{peak:>9.2f}{half_map.resolution_at(0.143):>12.2f}"
            f"{high_shell_mean(joint.fsc, n):>14.3f}{joint.resolution_at(0.5):>12.2f}{error:>12}  {note}")


def error_row(name: str, errors_deg: np.ndarray, note: str) -> str:
    """A table row with only the median rotation error: a bound or search, not a program run."""
    return f"{name:<26}{'':>9}{'':>9}{'':>12}{'':>14}{'':>12}{np.median(errors_deg):>12.2f}  {note}"


def refine_run(run: str, star_name: str, pixel_A: float) -> tuple[str, list[str], str, str]:
    """The input STAR, options, output folder and row name of a ``cryosgd refine`` run."""
    return {
        "em": ("particles_noposes.star", ["--ref", "ref.mrc", "--update", "em"], "refine_em",
               "cryosgd refine --update em"),
        "sgd": ("particles_noposes.star", ["--ref", "ref.mrc", "--update", "sgd"], "refine_sgd",
                "cryosgd refine --update sgd"),
        "oracle": (star_name, ["--ref", "truth.mrc", "--local", "--ini-res", f"{2 * pixel_A:g}"], "refine_oracle",
                   "cryosgd refine (oracle)"),
        "subset-em": ("relion_subset.star", ["--ref", "ref.mrc"], "refine_subset", "cryosgd refine (subset)"),
        "subset-local": ("relion_subset_true.star", ["--ref", "ref.mrc", "--local"], "refine_subset_local",
                         "cryosgd --local (true)"),
    }[run]


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--runs", nargs="+", default=["known", "em", "sgd", "relion"])
    parser.add_argument("--relion-particles", type=int, default=3000)
    parser.add_argument("--relion-minutes", type=float, default=30.0)
    parser.add_argument("--diameter", type=float, default=None, help="particle diameter (Å), default 0.8 box")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="refine_bench_"))
    start = time.perf_counter()
    star = make_dataset(root, args.particles, args.box, args.pixel, args.snr, model=args.model)
    prepare(root, star, args.pixel, args.relion_particles)
    print(f"dataset: {args.particles} particles of {args.model}, box {args.box}, {args.pixel} Å, SNR {args.snr} "
          f"(relion_project, {time.perf_counter() - start:.0f} s) in {root}", flush=True)
    truth, _ = read_map(root / "truth.mrc")
    diameter = args.diameter or 0.8 * args.box * args.pixel
    rows = [f"{'program':<26}{'wall s':>9}{'peak GB':>9}{'half-map Å':>12}{'FSC n/4..n/2':>14}"
            f"{'truth 0.5 Å':>12}{'median err°':>12}"]
    for run in args.runs:
        before = len(rows)
        if run == "known":
            seconds, peak, _ = run_measured([sys.executable, "-m", "cryosgd", "reconstruct", star.name, "-o", "known",
                                             "--force"], root)
            halves = [read_map(root / "known" / f"half{h}.mrc")[0] for h in (1, 2)]
            rows.append(measure("cryosgd reconstruct (true)", seconds, peak, halves, None, truth, star, args.pixel))
        elif run in ("em", "sgd", "oracle", "subset-em", "subset-local"):
            star_name, options, out, name = refine_run(run, star.name, args.pixel)
            seconds, peak, _ = run_measured([sys.executable, "-m", "cryosgd", "refine", star_name, *options, "-o", out,
                                             "--force", "--particle-diameter", f"{diameter:.0f}"], root)
            halves = [read_map(root / out / f"half{h}.mrc")[0] for h in (1, 2)]
            note = f"the first {args.relion_particles} particles" if run.startswith("subset") else ""
            rows.append(measure(name, seconds, peak, halves, root / out / "particles.star", truth, star, args.pixel,
                                note))
        elif run == "bound":  # no program: the Cramér–Rao bound on the rotations (pose_error_bound.py)
            rows.append(error_row("Cramér–Rao bound", bound_deg(root, star.name, particles=2000),
                                  "2,000 particles, the truth as reference"))
        elif run == "reference":  # no program: searches from the true poses (pose_error_reference.py)
            rows.extend(error_row(f"from true, {name}", errors, f"2,000 particles, a local search against the {name}")
                        for name, errors in reference_errors(root, star.name, diameter_A=diameter).items())
        elif run in ("relion", "relion-local"):
            local = run == "relion-local"
            out = "relion_local" if local else "relion"
            shutil.rmtree(root / out, ignore_errors=True)  # no earlier run's iterations
            (root / out).mkdir()
            seconds, peak, finished = run_measured(relion_command(out, diameter, from_true_poses=local), root,
                                                   timeout_s=60 * args.relion_minutes)
            result = relion_outputs(root / out, converged=finished)
            name = "relion_refine_mpi (true)" if local else "relion_refine_mpi"
            if result is None:
                rows.append(f"{name}: no iteration finished in {seconds:.0f} s")
            else:
                half1, half2, data_star, iteration = result
                note = (f"{args.relion_particles} particles; " +
                        ("converged" if finished else f"stopped at the {args.relion_minutes:.0f}-minute cap") +
                        f"; iteration {iteration}")
                rows.append(measure(name, seconds, peak, (half1, half2), data_star, truth, star, args.pixel, note))
        print("\n".join(rows[before:]), flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
