"""Shared fixtures: small datasets made on the fly, and the RELION skip rule."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cryosgd.data.particles import OpticsGroup, ParticleTable

FIXTURES = Path(__file__).parent / "fixtures"


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


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])
