"""Refinement with unknown poses on a small simulated dataset: poses and map recovered from a
30 Å low-pass of the truth, a resumed run equals an uninterrupted one, RELION reconstructs the
written poses into the same map, and bad inputs are one-line errors."""

import json
import re
import subprocess

import numpy as np
import pytest
import torch

from cryosgd import api
from cryosgd.conventions import euler_to_matrix
from cryosgd.data.particles import read_particles, write_particles
from cryosgd.errors import InputError
from cryosgd.fourier.fsc import fsc
from cryosgd.io.mrc import read_map, write_map
from cryosgd.pose.so3 import geodesic_distance_deg
from cryosgd.recon.refine import RefineInput
from cryosgd.recon.settings import RefineSettings
from cryosgd.sim.phantom import blob_phantom

from conftest import blob_dataset, correlation, run_cli

BOX, PIXEL_A = 40, 3.0
SOFT_N, SOFT_SNR = 3000, 0.02


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return blob_dataset(tmp_path_factory.mktemp("refine"), 1200, BOX, PIXEL_A)


@pytest.fixture(scope="module")
def refined(dataset, tmp_path_factory):
    """Refinement of the particles with their poses and origins removed from the STAR file."""
    star, truth = dataset
    table = read_particles(star)
    table.angles_deg, table.shift_A = None, np.zeros_like(table.shift_A)
    write_particles(star.parent / "no_poses.star", table)
    out = tmp_path_factory.mktemp("out") / "r"
    code, text = run_cli("refine", star.parent / "no_poses.star", "--ref", truth, "-o", out, "--max-iter", 6,
                         "--batch-size", 400)
    assert code == 0, text
    return out


def _metrics(out) -> list[dict]:
    """The rows of a refinement's ``metrics.jsonl``, one per iteration."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _errors_deg(truth_star, refined_star):
    truth, found = read_particles(truth_star), read_particles(refined_star)
    a = euler_to_matrix(torch.tensor(truth.angles_deg))
    b = euler_to_matrix(torch.tensor(found.angles_deg))
    return geodesic_distance_deg(a, b).numpy(), np.linalg.norm(truth.shift_A - found.shift_A, axis=1)


def test_refinement_recovers_the_poses_and_the_map(dataset, refined, tmp_path):
    star, truth_path = dataset
    rotation_error, shift_error = _errors_deg(star, refined / "particles.star")
    metrics = _metrics(refined)
    # measured 1.30° (1.39° with best poses alone): what half maps of 600 particles
    # allow (the same search against the true map finds these poses to 0.1°,
    # tests/test_search.py)
    assert np.median(rotation_error) < 1.5 and np.mean(rotation_error > 10) < 0.01
    assert metrics[-1]["final_step_deg"] < 1.5  # measured 0.94°: a sixteenth of the global grid's 15°
    assert np.median(shift_error) < 0.5 * PIXEL_A
    truth, _ = read_map(truth_path)
    assert run_cli("reconstruct", star, "-o", tmp_path / "known")[0] == 0  # the same particles, true poses
    ours = fsc(read_map(refined / "map.mrc")[0], truth, PIXEL_A).fsc[1:BOX // 2]
    known = fsc(read_map(tmp_path / "known" / "map.mrc")[0], truth, PIXEL_A).fsc[1:BOX // 2]
    assert ours.mean() >= known.mean() - 0.05, (ours.mean(), known.mean())
    assert metrics[0]["band_A"] > metrics[-1]["band_A"]  # the band followed the resolution
    table = read_particles(refined / "particles.star")
    assert set(table.random_subset) == {1, 2}
    assert {"rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples", "rlnLogLikeliContribution"} <= set(table.extra)


def test_refinement_by_sgd_updates_recovers_the_poses_and_the_map_too(dataset, refined, tmp_path):
    """``--update sgd``: epochs of preconditioned minibatch steps between the first and last em
    passes, each minibatch's poses searched against the current map, reach the em default's
    poses and map (measured: 1.49° against 1.30°, FSC to the truth 0.879 against 0.866)."""
    star, truth_path = dataset
    out = tmp_path / "sgd"
    code, text = run_cli("refine", star.parent / "no_poses.star", "--ref", truth_path, "-o", out, "--max-iter", 6,
                         "--batch-size", 400, "--update", "sgd")
    assert code == 0, text
    updates = [m["update"] for m in _metrics(out)]
    assert updates[0] == updates[-1] == "em" and "sgd" in updates[1:-1], updates
    rotation_error, _ = _errors_deg(star, out / "particles.star")
    assert np.median(rotation_error) < 2.0 and np.mean(rotation_error > 10) < 0.01
    truth, _ = read_map(truth_path)
    sgd, em = (fsc(read_map(d / "map.mrc")[0], truth, PIXEL_A).fsc[1:BOX // 2].mean() for d in (out, refined))
    assert sgd >= em - 0.03, (sgd, em)


def test_the_last_maps_weigh_each_particle_over_its_posterior_grid(tmp_path):
    """At low SNR the best pose alone puts each image where its noise best matches the
    reference, and the map inherits that; the last iteration's maps from the 8 most likely
    poses of each particle's posterior grid are closer to the truth (the same particles, one
    local iteration from the true poses against the truth)."""
    from cryosgd.sim.simulate import SimulationSettings, simulate
    truth = blob_phantom(32, n_blobs=24, sigma_px=1.2, seed=11)
    write_map(tmp_path / "truth.mrc", truth, PIXEL_A)
    star = simulate(tmp_path / "truth.mrc", tmp_path / "sim", SimulationSettings(n_particles=SOFT_N, snr=SOFT_SNR, seed=5))
    high = {}
    for poses in (1, 8):
        out = tmp_path / f"soft{poses}"
        code, text = run_cli("refine", star, "--ref", tmp_path / "truth.mrc", "--local", "--ini-res", 2 * PIXEL_A,
                             "--max-iter", 1, "--soft-poses", poses, "-o", out)
        assert code == 0, text
        high[poses] = fsc(read_map(out / "map.mrc")[0], truth, PIXEL_A).fsc[8:16].mean()
        table = read_particles(out / "particles.star")
        assert int(max(table.extra["rlnNrOfSignificantSamples"], key=int)) == poses
    assert high[8] > high[1] + 0.03, high  # measured 0.583 against 0.518


def test_the_noise_sample_draws_from_every_optics_group():
    """σ² is re-estimated from ``size`` images of each optics group (all of a smaller one),
    drawn from the whole group, the same whatever the order of the other groups."""
    from cryosgd.recon.refine import noise_sample
    groups = np.array([0] * 25_000 + [1] * 30 + [2] * 9_000)[np.random.default_rng(0).permutation(34_030)]
    sample = noise_sample(groups, size=4000)
    assert np.bincount(groups[sample]).tolist() == [4000, 30, 4000]
    chosen = np.flatnonzero(sample & (groups == 0))
    assert np.abs(np.bincount(chosen % 2)[1] - 2000) < 150  # not every k-th: both ranks of two get a share
    assert (np.flatnonzero(groups == 0)[-1] - chosen[-1]) < 100 and chosen[0] < np.flatnonzero(groups == 0)[100]
    assert noise_sample(groups[:100], size=4000).all()


def test_sigma2_comes_from_the_noise_sample_at_its_best_poses(dataset, monkeypatch):
    """The residual power a search adds up for σ² is that of the sampled images (a third here)
    at the poses it found, recomputed from each batch's images put at those poses."""
    from cryosgd.conventions import map_to_ft
    from cryosgd.data.stack import ImageStack
    from cryosgd.fourier.grids import FourierGrid
    from cryosgd.objective.loss import LeastSquares
    from cryosgd.objective.noise import residual_power
    from cryosgd.recon import refine as R
    from cryosgd.recon.halves import HalfSet
    from cryosgd.recon.settings import ReconstructionSettings, RefineSettings
    star, truth = dataset
    table = read_particles(star).subset(np.arange(300))
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    half = HalfSet(table, stack, grid, ReconstructionSettings(batch_size=70), half=1, dtype=torch.float64)
    chosen = np.arange(len(table)) % 3 == 1
    monkeypatch.setattr(R, "noise_sample", lambda groups: chosen)
    reference = map_to_ft(torch.as_tensor(read_map(truth)[0], dtype=torch.float64))
    shells = int(grid.shell_px.max()) + 1
    plan = R._Plan(3, 10.0, 3.0, torch.ones(1, shells, dtype=torch.float64), None, RefineSettings(),
                   torch.eye(3, dtype=torch.float64)[None], 50.0)
    found = R._search_half(half, reference, plan, R._table_poses(half))
    poses = found.table()
    expected = 0.0
    for batch in half.parts(None):
        rows = np.flatnonzero(chosen[batch.index])
        particles = torch.as_tensor(batch.index[rows])
        at_best = batch.take(torch.as_tensor(rows)).with_poses(poses.rotations[particles, 0],
                                                               poses.shift_A[particles, 0])
        expected = expected + residual_power(LeastSquares(half.model, 0.0), reference, at_best, 1)[0]
    torch.testing.assert_close(found.power, expected)
    assert float(found.counts.sum()) == chosen.sum()
    moved = R.geodesic_distance_deg(poses.rotations[:, 0], R._table_poses(half).rotations[:, 0])
    assert float(moved.max()) > 0.1  # the search moved the poses: the residuals are at the found ones


def _killed_after_two_then_resumed(monkeypatch, *args) -> None:
    """``cryosgd *args`` interrupted (as by Ctrl-C) after its second checkpoint, then run again
    with ``--resume`` to the end."""
    import cryosgd.recon.refine as refine
    real_save, saved = refine._Run.save, []

    def killed_after_two(self, state, metrics):
        real_save(self, state, metrics)
        saved.append(state.iteration)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(refine._Run, "save", killed_after_two)
    code, text = run_cli(*args)
    assert code == 130 and "--resume" in text.splitlines()[-1], text
    monkeypatch.setattr(refine._Run, "save", real_save)
    code, text = run_cli(*args, "--resume")
    assert code == 0, text


def _assert_same_half_maps(found, expected):
    for name in ("half1.mrc", "half2.mrc"):
        want = read_map(expected / name)[0]
        np.testing.assert_allclose(read_map(found / name)[0], want, rtol=0, atol=1e-3 * np.abs(want).max())


def test_a_killed_refinement_resumes_to_the_same_result(dataset, refined, tmp_path, monkeypatch):
    star, truth = dataset
    _killed_after_two_then_resumed(monkeypatch, "refine", star.parent / "no_poses.star", "--ref", truth,
                                   "-o", tmp_path / "r", "--max-iter", 6, "--batch-size", 400)
    _assert_same_half_maps(tmp_path / "r", refined)
    iterations = len(_metrics(tmp_path / "r"))  # a finished run resumed with more iterations allowed: not reopened
    code, text = run_cli("refine", star.parent / "no_poses.star", "--ref", truth, "-o", tmp_path / "r", "--max-iter",
                         12, "--batch-size", 400, "--resume")
    assert code == 0 and f"had finished at iteration {iterations}:" in text, text
    assert len(_metrics(tmp_path / "r")) == iterations


def test_an_iteration_stalls_only_when_neither_the_fsc_nor_the_poses_move():
    """The half-map FSC stalls while the poses still improve (their posterior grids shrink):
    an iteration has stalled when its FSC rose by less than 0.002 and fewer than 1 % of the
    poses moved; three iterations in a row without the FSC rising stop a run whatever the
    poses do."""
    from cryosgd.recon import refine as R
    state = R.RefineState(4, (None, None), None, None, 63.0, 1.5, fsc_mean=0.900, stalled=0, done=False,
                          fsc_stalls=1)
    assert R._stalls(state, 0.9005, changed=0.05) == (0, 2)  # the FSC stalled, the poses did not
    assert R._stalls(state, 0.9100, changed=0.001) == (0, 0)  # the FSC rose
    assert R._stalls(state, 0.9005, changed=0.005) == (1, 2)  # both stalled
    assert R._stalls(state, 0.9005, changed=0.01) == (0, 2)  # 1 % moved: not settled
    assert not R._has_stalled(0, 2) and R._has_stalled(0, 3) and R._has_stalled(1, 0)


def test_a_stalled_em_iteration_at_nyquist_on_the_grid_is_the_last_and_resumes_exactly(dataset, tmp_path,
                                                                                       monkeypatch):
    """``--local`` from the true poses: every iteration ends on the posterior grid; the run
    stops at the first stalled em iteration at Nyquist (from the third: the half-map FSC rose
    by less than 0.002 and fewer than 1 % of the poses moved), not one later. With
    ``--update sgd`` an sgd iteration is never the last. A run killed after two iterations
    resumes from poses of the grid to the uninterrupted run's maps."""
    star, truth = dataset
    nyquist = BOX / 2 - 1

    def run(out, *extra):
        code, text = run_cli("refine", star, "--ref", truth, "--local", "--ini-res", 9, "--max-iter", 8,
                             "--batch-size", 400, "-o", out, *extra)
        assert code == 0, text
        return _metrics(out)

    metrics = run(tmp_path / "em")
    assert 3 <= len(metrics) < 8, [m["fsc_mean"] for m in metrics]
    assert metrics[-1]["band_px"] == nyquist and metrics[-1]["update"] == "em"

    def stalled(before, m):
        return m["fsc_mean"] < before["fsc_mean"] + 0.002 and m["changed"] < 0.01

    assert stalled(metrics[-2], metrics[-1])
    assert not any(stalled(before, m) and m["band_px"] == nyquist
                   for before, m in zip(metrics[1:-1], metrics[2:-1]))  # no earlier stall at Nyquist
    sgd = run(tmp_path / "sgd", "--update", "sgd")
    assert sgd[-1]["update"] == "em", [m["update"] for m in sgd]

    from cryosgd.recon import refine as R  # poses that never settle: the FSC's patience stops the run
    monkeypatch.setattr(R, "_changed", lambda *args: 0.5)
    moving = run(tmp_path / "moving")
    assert len(moving) > len(metrics), (len(moving), len(metrics))
    assert len(moving) == 8 or all(m["fsc_mean"] < before["fsc_mean"] + 0.002
                                   for before, m in zip(moving[-4:-1], moving[-3:]))
    monkeypatch.undo()

    _killed_after_two_then_resumed(monkeypatch, "refine", star, "--ref", truth, "--local", "--ini-res", 9,
                                   "--max-iter", 8, "--batch-size", 400, "-o", tmp_path / "killed")
    assert [m["iteration"] for m in _metrics(tmp_path / "killed")] == [m["iteration"] for m in metrics]
    _assert_same_half_maps(tmp_path / "killed", tmp_path / "em")


def test_relion_reconstructs_the_written_poses_into_the_same_map(dataset, refined, tmp_path, relion):
    """The image names are the input STAR's (as RELION keeps them): RELION runs from its folder."""
    star, _ = dataset
    result = subprocess.run(["relion_reconstruct", "--i", str(refined / "particles.star"), "--o",
                             str(tmp_path / "relion.mrc"), "--ctf"], cwd=star.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert correlation(read_map(tmp_path / "relion.mrc")[0], read_map(refined / "map.mrc")[0]) > 0.9


@pytest.mark.parametrize("problem,expected", [
    ("not_a_map", "not a valid MRC file"),
    ("zero_reference", "the reference is all zero"),
    ("tiny_reference", "cannot be resampled"),
    ("bad_mask", "a mask of box 24"),
    ("mask_voxel", f"mask.mrc: voxel size {2 * PIXEL_A:g} Å differs from the particles' {PIXEL_A:g} Å"),
    ("no_ctf", "no CTF columns"),
    ("one_half", "rlnRandomSubset: half-set 2 is empty"),
    ("bad_sym", "--sym X7: expected C1, Cn, Dn, T, O or I"),
    ("wide_mask", "--particle-diameter 500: wider than the particles' box"),
    ("fine_join", f"--join-res {2 * PIXEL_A:g}: finer than {3 * PIXEL_A:g} Å, 1.5 × Nyquist"),
])
def test_bad_refinement_input_is_a_one_line_error(dataset, tmp_path, problem, expected):
    star, truth = dataset
    args = ["refine", star, "--ref", truth, "-o", tmp_path / "out"]
    if problem == "not_a_map":
        (tmp_path / "ref.mrc").write_text("not a map")
        args[3] = tmp_path / "ref.mrc"
    elif problem == "zero_reference":
        write_map(tmp_path / "ref.mrc", np.zeros((BOX,) * 3, dtype=np.float32), PIXEL_A)
        args[3] = tmp_path / "ref.mrc"
    elif problem == "tiny_reference":
        write_map(tmp_path / "ref.mrc", blob_phantom(8), 1.0)
        args[3] = tmp_path / "ref.mrc"
    elif problem in ("bad_mask", "mask_voxel"):
        box, voxel_A = (24, PIXEL_A) if problem == "bad_mask" else (BOX, 2 * PIXEL_A)
        write_map(tmp_path / "mask.mrc", np.ones((box,) * 3, dtype=np.float32), voxel_A)
        args += ["--mask", tmp_path / "mask.mrc"]
    elif problem in ("no_ctf", "one_half"):
        table = read_particles(star)
        table.image_name = [f"{n.split('@')[0]}@{star.parent / n.split('@')[1]}" for n in table.image_name]
        if problem == "no_ctf":
            table.defocus_u_A = None
        else:
            table.random_subset[:] = 1
        write_particles(tmp_path / "edited.star", table)
        args[1] = tmp_path / "edited.star"
    elif problem == "wide_mask":
        args += ["--particle-diameter", 500]
    elif problem == "fine_join":
        args += ["--join-res", 2 * PIXEL_A]
    else:
        args += ["--sym", "X7"]
    code, out = run_cli(*args)
    assert code == 2 and out.startswith("error: ") and out.strip().count("\n") == 0 and expected in out, out
    assert not (tmp_path / "out").exists()


def test_a_global_grid_with_no_rotation_in_the_asymmetric_unit_is_refused(dataset, tmp_path):
    """HEALPix order 1 (30°) has no direction in an icosahedral asymmetric unit; order 2 has."""
    star, truth = dataset
    with pytest.raises(InputError, match="global_order 1 with --sym I: no rotation of its grid lies in the "
                                         "asymmetric unit; use 2 or more"):
        api.refine(star, truth, tmp_path / "out", RefineSettings(sym="I", global_order=1), show_progress=False)
    assert not (tmp_path / "out").exists()
    RefineInput.read(star, truth, RefineSettings(sym="I", global_order=2))


@pytest.mark.parametrize("box,voxel_A,refused", [
    (BOX, PIXEL_A, None), (BOX // 2, 2 * PIXEL_A, None), (BOX, 0.0, None),  # 0: a header that does not say
    (BOX, 2 * PIXEL_A, f"differs from the particles' {PIXEL_A:g} Å"),
    (BOX // 2, PIXEL_A, f"differs from the working box's (--box {BOX // 2}) {2 * PIXEL_A:g} Å"),
    (BOX // 4, PIXEL_A, f"expected the particles' box {BOX} or the working box {BOX // 2} (--box)"),
])
def test_a_mask_is_taken_on_the_particles_grid_or_the_working_box_and_no_other(tmp_path, box, voxel_A, refused):
    from cryosgd.errors import InputError
    from cryosgd.fourier.grids import FourierGrid
    from cryosgd.recon.refine import _mask
    from cryosgd.recon.settings import RefineSettings
    grid = FourierGrid.create(BOX, PIXEL_A, BOX // 2)
    write_map(tmp_path / "mask.mrc", np.ones((box,) * 3, dtype=np.float32), voxel_A)
    if refused is None:
        assert _mask(tmp_path / "mask.mrc", RefineSettings(), grid).shape == (BOX // 2,) * 3
    else:
        with pytest.raises(InputError, match=re.escape(refused)):
            _mask(tmp_path / "mask.mrc", RefineSettings(), grid)
