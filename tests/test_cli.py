"""The command line: real files in, real files out, one-line errors on bad input."""

import numpy as np
import pytest
from typer.testing import CliRunner

from cryosgd.cli import app
from cryosgd.data.particles import read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.io.mrc import read_map, write_map
from cryosgd.model.phantom import blob_phantom

from conftest import correlation, random_particles

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_project_writes_stack_and_star_that_reads_back(tmp_path):
    write_map(tmp_path / "map.mrc", blob_phantom(32, seed=1), 2.0)
    write_particles(tmp_path / "in.star", random_particles(5, 32, 2.0))
    code, out = _invoke("project", tmp_path / "map.mrc", tmp_path / "in.star", "-o", tmp_path / "proj.mrcs")
    assert code == 0, out
    table = read_particles(tmp_path / "proj.star")
    images = ImageStack(table).read(np.arange(5))
    assert images.shape == (5, 32, 32) and images.std() > 0
    assert table.pixel_A == 2.0


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
                "pixel_mismatch": "rlnImagePixelSize 3.0 differs", "bad_interp": "--interp cubic"}[problem]
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
