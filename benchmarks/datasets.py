"""Datasets for the benchmarks, made by relion_project from atomic models, and process timing.

Models: ``1ubq`` (ubiquitin, shipped, 8.5 kDa) and ``ubq12`` (twelve copies of 1UBQ in a
compact asymmetric cluster drawn with a fixed seed, ≈ 103 kDa, a particle of ≈ 100 Å: the size
POSES.md's estimates assume). The ground truth is the model rendered with gemmi's electron
form factors and blurred by B = 50 Å²; ``relion_project --ctf`` projects it at uniform poses,
normal origins (σ 3 Å) and defoci 0.8–2.5 µm, first without noise to measure the signal
variance, then ``--add_noise --white_noise σ`` at the requested SNR (signal variance over the
whole box / noise variance).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import time
from importlib import resources
from pathlib import Path

import gemmi
import numpy as np

from cryosgd.data.particles import read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.io.mrc import write_map
from cryosgd.sim.simulate import SimulationSettings, blur, model_to_map, random_table


def run_measured(args: list[str], cwd: Path, timeout_s: float | None = None,
                 env: dict | None = None) -> tuple[float, float, bool]:
    """Run a command in a session of its own; (wall seconds, peak resident memory of the
    session, all its processes together, in GB, sampled every 0.2 s; whether it finished before
    ``timeout_s``). A command that fails stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env=None if env is None else {**os.environ, **env})
    peak, finished = 0, True
    while proc.poll() is None:
        peak = max(peak, sum(_session_rss_bytes(proc.pid).values()))
        if timeout_s is not None and time.perf_counter() - start > timeout_s:
            for pid in _session_rss_bytes(proc.pid):  # every rank, not only mpirun's process group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            proc.wait()
            finished = False
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if finished and proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.read().decode()[-3000:]}")
    return seconds, peak / 1e9, finished


def matching_rows(true, found) -> np.ndarray:
    """Rows of the table ``true`` for the particles of ``found`` (by image name)."""
    position = {name: i for i, name in enumerate(true.image_name)}
    return np.array([position[name] for name in found.image_name])


def high_shell_mean(fsc_values: np.ndarray, box: int) -> float:
    """The mean of an FSC curve over shells n/4 … n/2 of a box of n: the benchmarks' one
    number for a map against the truth."""
    return float(np.nanmean(fsc_values[box // 4:box // 2 + 1]))


def _session_rss_bytes(session: int) -> dict[int, int]:
    """Every process of session ``session`` (Linux /proc): pid → resident bytes. A session, not a
    process group: mpirun puts each rank in a process group of its own."""
    processes = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == session:
                processes[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss pages
        except (OSError, ValueError, IndexError):
            continue
    return processes


def atomic_model(kind: str, folder: Path) -> Path:
    """A PDB file of the model ``kind`` (module docstring)."""
    with resources.as_file(resources.files("cryosgd") / "data" / "1ubq.pdb") as pdb:
        if kind == "1ubq":
            return Path(pdb)
        if kind != "ubq12":
            raise SystemExit(f"unknown model {kind}")
        structure = gemmi.read_structure(str(pdb))
    structure.remove_hydrogens()
    structure.remove_ligands_and_waters()
    base = structure[0]
    centre = base.calculate_center_of_mass()
    rng = np.random.default_rng(12)
    assembly = gemmi.Model("1")
    for copy in range(12):
        rotation = _random_rotation(rng)
        offset = rng.normal(size=3)
        offset *= 22.0 * rng.uniform(0.6, 1.0) ** (1 / 3) / np.linalg.norm(offset)
        for chain in base:
            new = gemmi.Chain(chr(ord("A") + copy))
            for residue in chain:
                new.add_residue(residue)
            for residue in new:
                for atom in residue:
                    p = np.array([atom.pos.x - centre.x, atom.pos.y - centre.y, atom.pos.z - centre.z])
                    atom.pos = gemmi.Position(*(rotation @ p + offset))
            assembly.add_chain(new)
    out = gemmi.Structure()
    out.add_model(assembly)
    out.cell = structure.cell
    path = folder / "ubq12.pdb"
    out.write_pdb(str(path))
    return path


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def dataset_parser(doc: str, pixel_A: float = 3.0, model: str = "ubq12") -> argparse.ArgumentParser:
    """The command line shared by the benchmarks that run on a ``make_dataset`` dataset."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--particles", type=int, default=10000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--pixel", type=float, default=pixel_A, help="pixel size (Å)")
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--model", default=model, choices=("1ubq", "ubq12"))
    parser.add_argument("--workdir", type=Path, default=None, help="dataset folder, reused when it holds one")
    return parser


def make_dataset(root: Path, n: int, box: int, pixel_A: float, snr: float, seed: int = 0,
                 model: str = "1ubq") -> Path:
    """``root/particles.star`` (RELION 3.1, true poses) and ``root/truth.mrc``; reused when present."""
    root.mkdir(parents=True, exist_ok=True)
    if (root / "particles.star").exists() and (root / "truth.mrc").exists():
        return root / "particles.star"
    truth = blur(model_to_map(atomic_model(model, root), box, pixel_A), pixel_A, 50.0)
    write_map(root / "truth.mrc", truth, pixel_A)
    table = random_table(SimulationSettings(n_particles=n, seed=seed), pixel_A, box)
    write_particles(root / "poses.star", table)
    probe = min(n, 300)
    write_particles(root / "probe.star", table.subset(np.arange(probe)))
    run_measured(["relion_project", "--i", "truth.mrc", "--ang", "probe.star", "--o", "clean", "--ctf"], root)
    clean = ImageStack(read_particles(root / "clean.star")).read(np.arange(probe))
    sigma = float(np.sqrt(clean.var(axis=(1, 2)).mean() / snr))
    run_measured(["relion_project", "--i", "truth.mrc", "--ang", "poses.star", "--o", "particles", "--ctf",
                  "--add_noise", "--white_noise", f"{sigma}"], root)
    return root / "particles.star"
