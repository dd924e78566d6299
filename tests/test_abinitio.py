"""Ab initio from particles alone, the hand, and ``cryosgd auto`` from particles to a sharpened map."""

import json

import numpy as np
import pytest
import torch

from cryosgd.conventions import euler_to_matrix
from cryosgd.data.particles import read_particles
from cryosgd.io.mrc import read_map, write_map
from cryosgd.pose.compare import pose_errors
from cryosgd.pose.so3 import random_rotations
from cryosgd.recon.ab_initio import flip_hand
from cryosgd.sim.phantom import blob_phantom

from conftest import blob_dataset, correlation, run_cli

BOX, PIXEL_A = 40, 3.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return blob_dataset(tmp_path_factory.mktemp("abinitio"), 1000, BOX, PIXEL_A)


def _aligned_correlation(found: np.ndarray, truth: np.ndarray, rotation: torch.Tensor, mirrored: bool) -> float:
    """Correlation of the truth with the found map brought into the truth's frame: found poses
    are ``A Q`` (``F A F Q`` mirrored), so the truth is the found map at ``Qᵀ r`` (then mirrored)."""
    from scipy.ndimage import affine_transform
    flip = np.diag([1.0, 1.0, -1.0])
    m = rotation.numpy().T @ (flip if mirrored else np.eye(3))
    reverse = np.eye(3)[::-1]  # (x, y, z) ↔ array axes (z, y, x)
    matrix = reverse @ m @ reverse
    centre = np.full(3, BOX // 2)
    aligned = affine_transform(found.astype(np.float64), matrix, offset=centre - matrix @ centre, order=1)
    return correlation(aligned, truth)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_abinitio_recovers_the_structure_up_to_frame_and_hand(dataset, tmp_path, seed):
    star, truth_path = dataset
    code, out = run_cli("abinitio", star, "-o", tmp_path / "a", "--seed", seed)
    assert code == 0, out
    assert "hand" in out and "steps 1–20/" in out and "final search of all" in out, out
    truth = read_particles(star)
    found = read_particles(tmp_path / "a" / "particles.star")
    errors = pose_errors(euler_to_matrix(torch.tensor(truth.angles_deg)), euler_to_matrix(torch.tensor(found.angles_deg)))
    assert errors.median_deg <= 10, errors.median_deg
    volume, voxel_A = read_map(tmp_path / "a" / "initial.mrc")
    assert volume.shape == (BOX,) * 3 and voxel_A == pytest.approx(PIXEL_A, abs=1e-3)
    assert _aligned_correlation(volume, read_map(truth_path)[0], errors.rotation, errors.mirrored) > 0.7


def test_pose_errors_find_the_frame_and_the_hand():
    g = torch.Generator().manual_seed(0)
    true = random_rotations(200, g)
    q = random_rotations(1, g)[0]
    flip = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    for mirrored in (False, True):
        found = (flip @ true @ flip if mirrored else true) @ q
        errors = pose_errors(true, found)
        assert errors.mirrored == mirrored and errors.median_deg < 1e-6
        torch.testing.assert_close(errors.rotation, q)


def test_flip_mirrors_through_the_centre_and_twice_is_the_identity(tmp_path):
    volume = blob_phantom(16, seed=2)
    flipped = flip_hand(volume)
    np.testing.assert_array_equal(flip_hand(flipped), volume)
    np.testing.assert_array_equal(flipped[8], volume[8])  # the centre plane stays
    np.testing.assert_array_equal(flipped[8 + 3], volume[8 - 3])
    write_map(tmp_path / "m.mrc", volume, 2.0)
    assert run_cli("flip", tmp_path / "m.mrc", "-o", tmp_path / "f.mrc")[0] == 0
    np.testing.assert_array_equal(read_map(tmp_path / "f.mrc")[0], flipped)
    code, out = run_cli("flip", tmp_path / "m.mrc", "-o", tmp_path / "m.mrc", "--force")
    assert code == 2 and "would overwrite the input" in out


def test_a_killed_abinitio_resumes_to_the_same_map(dataset, tmp_path, monkeypatch):
    import cryosgd.recon.ab_initio as module
    star, _ = dataset
    assert run_cli("abinitio", star, "-o", tmp_path / "full", "--seed", 4)[0] == 0
    real_save, calls = module._save, []

    def killed(*args):
        real_save(*args)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_save", killed)
    code, out = run_cli("abinitio", star, "-o", tmp_path / "part", "--seed", 4)
    assert code == 130 and out.strip().endswith("--resume"), out
    monkeypatch.setattr(module, "_save", real_save)
    assert run_cli("abinitio", star, "-o", tmp_path / "part", "--seed", 4, "--resume")[0] == 0
    expected = read_map(tmp_path / "full" / "initial.mrc")[0]
    np.testing.assert_allclose(read_map(tmp_path / "part" / "initial.mrc")[0], expected, rtol=0,
                               atol=1e-3 * np.abs(expected).max())


def test_auto_goes_from_particles_to_a_sharpened_map_and_resumes_by_stage(dataset, tmp_path):
    star, truth_path = dataset
    code, out = run_cli("auto", star, "-o", tmp_path / "auto", "--max-iter", 4)
    assert code == 0, out
    top = tmp_path / "auto"
    for name in ("map_sharpened.mrc", "particles.star", "report.md", "sections.png", "abinitio/initial.mrc",
                 "refine/half1.mrc", "postprocess/fsc.csv", "postprocess/guinier.png"):
        assert (top / name).stat().st_size > 0, name
    stages = json.loads((top / "auto.json").read_text())
    assert list(stages) == ["abinitio", "refine", "postprocess"] and stages["postprocess"]["resolution_A"] < 12
    source = stages["postprocess"]["fsc_source"]  # which FSC the stage read the resolution from
    assert f"Resolution {stages['postprocess']['resolution_A']:.2f} Å** ({source})" in (top / "report.md").read_text()
    assert f"({source})" in out.strip().splitlines()[-1], out
    before = read_map(top / "map_sharpened.mrc")[0]  # its values: the MRC label holds the time of writing
    code, out = run_cli("auto", star, "-o", top, "--max-iter", 4, "--resume")  # every stage is done
    assert code == 0 and "iteration" not in out, out
    np.testing.assert_array_equal(read_map(top / "map_sharpened.mrc")[0], before)
