"""The command line: real files in, real files out, one-line errors on bad input."""

import numpy as np
import pytest

from cryosgd.data.particles import read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.io.mrc import read_map, write_map
from cryosgd.sim.phantom import blob_phantom

from conftest import correlation, random_particles, relion_ctf, run_cli as _invoke


def _independent_projection(volume, table, i):
    """Float64 real-space reference: Σ_z v(Aᵀ (x, y, z)) by cubic interpolation, moved by −origin,
    then the RELION CTF applied in Fourier space (conftest.relion_ctf)."""
    from scipy.ndimage import map_coordinates
    n, pixel_A = volume.shape[0], table.pixel_A
    c = np.arange(n) - n // 2
    y, x, z = np.meshgrid(c, c, c, indexing="ij")  # image rows (y), columns (x), depth (z)
    origin_px = table.shift_A[i] / pixel_A
    image_xyz = np.stack([x + origin_px[0], y + origin_px[1], z], axis=-1)
    map_xyz = image_xyz @ _relion_matrix(*table.angles_deg[i])  # Aᵀ r for row vectors r
    indices = [map_xyz[..., axis] + n // 2 for axis in (2, 1, 0)]  # array order [z, y, x]
    projection = map_coordinates(volume.astype(np.float64), indices, order=3, mode="constant").sum(axis=2)
    ky, kx = np.meshgrid(np.fft.fftfreq(n, pixel_A), np.fft.rfftfreq(n, pixel_A), indexing="ij")
    ft = np.fft.rfft2(np.fft.ifftshift(projection)) * relion_ctf(table, i, kx, ky)
    return np.fft.fftshift(np.fft.irfft2(ft, s=(n, n)))


def _relion_matrix(rot, tilt, psi):
    a, b, g = np.radians([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.array([[cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
                     [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
                     [sb * ca, sb * sa, cb]])


def test_project_matches_an_independent_float64_projection(tmp_path):
    volume = blob_phantom(32, seed=1, sigma_px=2.0)
    write_map(tmp_path / "map.mrc", volume, 2.0)
    table = random_particles(5, 32, 2.0, seed=3)
    write_particles(tmp_path / "in.star", table)
    code, out = _invoke("project", tmp_path / "map.mrc", tmp_path / "in.star", "-o", tmp_path / "proj.mrcs")
    assert code == 0, out
    written = read_particles(tmp_path / "proj.star")
    images = ImageStack(written).read(np.arange(5))
    assert written.pixel_A == 2.0 and images.shape == (5, 32, 32)
    for i in range(5):
        expected = _independent_projection(volume, table, i)
        assert correlation(images[i], expected) > 0.995
        assert np.abs(images[i]).max() == pytest.approx(np.abs(expected).max(), rel=0.02)


def test_simulate_from_atomic_model_keeps_ground_truth(tmp_path):
    from importlib import resources
    pdb = resources.files("cryosgd") / "data" / "1ubq.pdb"
    code, out = _invoke("simulate", pdb, "-o", tmp_path / "sim", "-n", 20, "--box", 48, "--pixel-size", 1.2,
                        "--snr", 1.0, "--seed", 3)
    assert code == 0, out
    truth, voxel = read_map(tmp_path / "sim" / "ground_truth.mrc")
    assert truth.shape == (48, 48, 48) and voxel == pytest.approx(1.2, abs=1e-4)
    table = read_particles(tmp_path / "sim" / "particles.star")
    assert len(table) == 20 and set(table.random_subset) == {1, 2}
    noisy = ImageStack(table).read(np.arange(20))
    code, _ = _invoke("project", tmp_path / "sim" / "ground_truth.mrc", tmp_path / "sim" / "particles.star",
                      "-o", tmp_path / "clean.mrcs")
    clean = ImageStack(read_particles(tmp_path / "clean.star")).read(np.arange(20))
    # SNR 1: correlation between noisy and clean images is √(1/2)
    assert correlation(noisy, clean) == pytest.approx(np.sqrt(0.5), abs=0.05)


def test_simulate_is_reproducible_with_a_seed(tmp_path):
    write_map(tmp_path / "map.mrc", blob_phantom(24, seed=1), 2.0)
    for name in ("a", "b"):
        assert _invoke("simulate", tmp_path / "map.mrc", "-o", tmp_path / name, "-n", 6, "--seed", 9)[0] == 0
    a = ImageStack(read_particles(tmp_path / "a" / "particles.star")).read(np.arange(6))
    b = ImageStack(read_particles(tmp_path / "b" / "particles.star")).read(np.arange(6))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("problem", ["not_mrc", "missing_column", "pixel_mismatch", "bad_interp"])
def test_bad_input_gives_one_line_error_and_writes_nothing(tmp_path, problem):
    write_map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 2.0)
    table = random_particles(3, 16, 2.0)
    write_particles(tmp_path / "in.star", table)
    args = ["project", tmp_path / "map.mrc", tmp_path / "in.star", "-o", tmp_path / "out.mrcs"]
    expected = {"not_mrc": "map.mrc: not a valid MRC file", "missing_column": "missing column rlnAngleTilt",
                "pixel_mismatch": "rlnImagePixelSize 3 Å in the file, but", "bad_interp": "argument --interp: invalid choice: 'cubic'"}[problem]
    if problem == "not_mrc":
        (tmp_path / "map.mrc").write_text("garbage")
    elif problem == "missing_column":
        text = (tmp_path / "in.star").read_text().replace("_rlnAngleTilt", "_rlnSomethingElse")
        (tmp_path / "in.star").write_text(text)
    elif problem == "pixel_mismatch":
        table.optics[0] = table.optics[0].__class__("g1", 300.0, 2.7, 0.1, 3.0, 16)
        write_particles(tmp_path / "in.star", table)
    else:
        args += ["--interp", "cubic"]
    code, out = _invoke(*args)
    assert code == 2
    assert out.strip().count("\n") == 0 and out.startswith("error: ") and expected in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.star", "map.mrc"]
