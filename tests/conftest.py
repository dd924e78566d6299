"""Shared fixtures: small datasets made on the fly, and the RELION skip rule."""

from __future__ import annotations

import io
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from cryosgd.cli import main
from cryosgd.data.particles import OpticsGroup, ParticleTable

FIXTURES = Path(__file__).parent / "fixtures"

# Tests run the eager kernels: a suite of short runs would otherwise compile kernels at moments
# that depend on the machine's speed. tests/test_slice.py checks the compiled kernels themselves.
os.environ.setdefault("CRYOSGD_COMPILE", "0")


@pytest.fixture
def relion():
    """Skip unless RELION 3.1's relion_project and relion_reconstruct are on PATH."""
    if not (shutil.which("relion_project") and shutil.which("relion_reconstruct")):
        if os.environ.get("CRYOSGD_REQUIRE_RELION"):
            pytest.fail("CRYOSGD_REQUIRE_RELION is set but RELION is not on PATH")
        pytest.skip("RELION not installed")


def random_particles(n: int, box: int, pixel_A: float, seed: int = 0, names: str | None = None) -> ParticleTable:
    """Uniform poses, non-zero origins, astigmatic CTFs over a range of defoci."""
    rng = np.random.default_rng(seed)
    angles = np.stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                       rng.uniform(-180, 180, n)], axis=1)
    du = rng.uniform(8000, 30000, n)
    return ParticleTable(
        optics=[OpticsGroup("g1", 300.0, 2.7, 0.1, pixel_A, box)], optics_group=np.zeros(n, dtype=int),
        image_name=None if names is None else [f"{i + 1:06d}@{names}" for i in range(n)],
        angles_deg=angles, shift_A=rng.uniform(-4, 4, (n, 2)) * pixel_A,
        defocus_u_A=du, defocus_v_A=du - rng.uniform(200, 3000, n), defocus_angle_deg=rng.uniform(0, 180, n),
        phase_shift_deg=np.zeros(n), bfactor_A2=np.zeros(n), ctf_scale=np.ones(n))


def blob_dataset(root: Path, n_particles: int, box: int, pixel_A: float) -> tuple[Path, Path]:
    """An asymmetric 24-blob phantom (``root/truth.mrc``) and ``n_particles`` simulated at SNR 5
    (``root/sim``): (the STAR file, the truth), for the pose-search tests."""
    from cryosgd.io.mrc import write_map
    from cryosgd.sim.phantom import blob_phantom
    from cryosgd.sim.simulate import SimulationSettings, simulate

    write_map(root / "truth.mrc", blob_phantom(box, n_blobs=24, sigma_px=1.2, seed=11), pixel_A)
    star = simulate(root / "truth.mrc", root / "sim", SimulationSettings(n_particles=n_particles, snr=5.0, seed=3))
    return star, root / "truth.mrc"


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def run_cli(*args) -> tuple[int, str]:
    """Run ``cryosgd ARGS`` in this process: (exit code, stdout and stderr together)."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
    return code, out.getvalue()


def relion_ctf(table, i, kx, ky):
    """RELION's CTF formula in numpy (RELION-CONVENTIONS.md), at frequencies in 1/Å."""
    g = table.optics[table.optics_group[i]]
    volts = g.voltage_kV * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1 + 0.978466e-6 * volts))
    s2 = kx**2 + ky**2
    du, dv, angle = table.defocus_u_A[i], table.defocus_v_A[i], np.radians(table.defocus_angle_deg[i])
    defocus = -((du + dv) / 2 + (du - dv) / 2 * np.cos(2 * (np.arctan2(ky, kx) - angle)))
    q0 = g.amplitude_contrast
    chi = (np.pi * lam * defocus * s2 + np.pi / 2 * g.cs_mm * 1e7 * lam**3 * s2**2
           - np.radians(table.phase_shift_deg[i]) - np.arctan(q0 / np.sqrt(1 - q0**2)))
    return -np.sin(chi) * table.ctf_scale[i] * np.exp(-table.bfactor_A2[i] * s2 / 4)
