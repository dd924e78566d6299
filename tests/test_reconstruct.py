"""Known-pose reconstruction: optimisers, the gold-standard driver, resume, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryosgd.data.particles import read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.fourier.grids import FourierGrid
from cryosgd.io.mrc import read_map, write_map
from cryosgd.sim.phantom import blob_phantom
from cryosgd.sim.simulate import SimulationSettings, simulate
from cryosgd.objective.diagonal import exact_diagonal
from cryosgd.objective.loss import LeastSquares
from cryosgd.analysis.convergence import converged, start
from cryosgd.recon.gold_standard import map_of
from cryosgd.recon.halves import HalfSet
from cryosgd.recon.known_pose import one_pass_map, run_epoch
from cryosgd.recon.settings import ReconstructionSettings

from conftest import correlation, run_cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    write_map(root / "truth.mrc", blob_phantom(32, seed=6, sigma_px=1.5), 3.0)
    simulate(root / "truth.mrc", root / "sim", SimulationSettings(n_particles=600, snr=0.5, seed=4))
    return root / "sim" / "particles.star"


def _half(star, **settings):
    table = read_particles(star)
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    return HalfSet(table, stack, grid, ReconstructionSettings(**settings), half=1, dtype=torch.float64)


def test_nearest_exact_diagonal_step_lands_on_least_squares_minimiser(dataset):
    half = _half(dataset, interp="nearest", batch_size=600)
    objective = LeastSquares(half.model, 1e-6)
    x0 = half.zeros()
    batch = next(half.parts(None))  # the whole half-set in one batch
    diagonal = exact_diagonal(objective, batch, torch.float64)
    gradient0 = objective.loss_and_gradient(x0, batch)[1]
    x1 = x0 - gradient0 / diagonal
    gradient1 = objective.loss_and_gradient(x1, batch)[1]
    assert float(gradient1.abs().max() / gradient0.abs().max()) < 1e-9


def _losses(star, method, epochs=3, batch_size=100, **extra):
    half = _half(star, method=method, batch_size=batch_size, **extra)
    state, losses = start(half), []
    for epoch in range(1, epochs + 1):
        state, metrics = run_epoch(half, state, epoch)
        losses.append(metrics["loss"])
    return losses


def test_algorithm1_reaches_lower_loss_than_plain_sgd(dataset):
    """The paper's regime: start 0, enough steps (12 per epoch here) for D to leave its start."""
    sgd = _losses(dataset, "sgd", epochs=6, batch_size=50, start="zero")
    paper = _losses(dataset, "algorithm1", epochs=6, batch_size=50, d0="one", start="zero")
    warm = _losses(dataset, "algorithm1", epochs=6, batch_size=50, d0="exact", start="zero")
    assert paper[-1] < sgd[-1] and warm[-1] < sgd[-1]
    assert warm[0] < paper[0]  # the exact start removes the identity warm-up of epoch 1


def test_preconditioned_cg_converges_faster_than_cg(dataset):
    cg = _losses(dataset, "cg", epochs=4)
    pcg = _losses(dataset, "pcg", epochs=4)
    assert all(b < a for a, b in zip(cg, cg[1:])) and all(b < a for a, b in zip(pcg, pcg[1:]))
    assert pcg[1] < cg[3]


def _reconstruct(star, out, *extra):
    return run_cli("reconstruct", star, "-o", out, "--batch-size", 150, *extra)


def test_reconstruct_writes_gold_standard_outputs(dataset, tmp_path):
    code, out = _reconstruct(dataset, tmp_path / "r", "--epochs", 3)
    assert code == 0, out
    half1, pixel = read_map(tmp_path / "r" / "half1.mrc")
    truth, _ = read_map(dataset.parent / "ground_truth.mrc")
    assert pixel == pytest.approx(3.0, abs=1e-4) and half1.shape == truth.shape
    assert correlation(read_map(tmp_path / "r" / "map.mrc")[0], truth) > 0.8
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["half"]) for m in metrics] == [(e, h) for e in (0, 1, 2, 3) for h in (1, 2)]
    rows = (tmp_path / "r" / "fsc.csv").read_text().splitlines()
    assert rows[0] == "shell,resolution_A,fsc" and len(rows) == 1 + 17
    assert "resolution (half-map FSC = 0.143)" in out
    for name in ("fsc.png", "progress.png", "checkpoint.pt", "half2.mrc"):
        assert (tmp_path / "r" / name).stat().st_size > 0


def test_epochs_0_writes_the_one_pass_map(dataset, tmp_path):
    """--epochs 0: half1.mrc is half 1's b / (H·1 + ridge), whatever an epoch would do to it."""
    assert _reconstruct(dataset, tmp_path / "p", "--epochs", 0, "--prior", "none")[0] == 0
    table = read_particles(dataset)
    index = np.nonzero(table.random_subset == 1)[0]
    stack = ImageStack(table).subset(index)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    half = HalfSet(table.subset(index), stack, grid, ReconstructionSettings(prior="none"), 1, dtype=torch.float64)
    expected = map_of(one_pass_map(half, start(half)), grid, "trilinear")
    written = read_map(tmp_path / "p" / "half1.mrc")[0]
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def _full_loss(half, x, ridge):
    objective = LeastSquares(half.model, ridge)
    data, = half.pass_mean(lambda batch: (objective.data_loss(x, batch),))
    return float(data) + float(objective.ridge_loss(x))


@pytest.mark.parametrize("method", ["algorithm1", "exact-diag", "sgd"])
def test_every_sgd_epoch_moves_towards_the_least_squares_minimum(dataset, method):
    """Trilinear: the one-pass map is not the minimiser of the objective. Each epoch must lower
    the loss gap to the minimum (converged PCG), and three must close at least a fifth of it
    (measured: 33–45 %); an epoch that made the map worse, or did nothing, fails."""
    half = _half(dataset, method=method, prior="none", batch_size=50)
    state = start(half)
    maps = [state.x]
    for epoch in (1, 2, 3):
        state, _ = run_epoch(half, state, epoch)
        maps.append(state.x)
    minimum = converged(_half(dataset, method="pcg", prior="none"), 30)
    gap = [_full_loss(half, x, state.ridge) - _full_loss(half, minimum, state.ridge) for x in maps]
    assert gap[0] > 0 and all(b < a for a, b in zip(gap, gap[1:])) and 0 <= gap[-1] < 0.8 * gap[0], gap


def _shell_amplitudes(volume, shells):
    ft = np.fft.fftn(np.fft.ifftshift(volume))
    k = np.fft.fftfreq(volume.shape[0], 1 / volume.shape[0])
    radius = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)
    return np.array([np.sqrt(np.mean(np.abs(ft[radius == s]) ** 2)) for s in shells])


def test_one_pass_trilinear_map_has_the_true_amplitude(dataset, tmp_path):
    """b / H·1 (RELION's division by the data weights), not b / diag(H), which is ≈ 3.5× too big."""
    assert _reconstruct(dataset, tmp_path / "p", "--epochs", 0, "--prior", "none")[0] == 0
    truth, _ = read_map(dataset.parent / "ground_truth.mrc")
    ratio = _shell_amplitudes(read_map(tmp_path / "p" / "map.mrc")[0], range(1, 7)) / _shell_amplitudes(truth, range(1, 7))
    assert np.all((ratio > 0.6) & (ratio < 1.25)), ratio


def test_map_is_the_joint_solve_of_all_particles(dataset, tmp_path):
    """Nearest interpolation, where H is diagonal: the map from the two halves equals the
    least-squares map of all particles (not the mean of the half maps)."""
    options = ("--epochs", 0, "--interp", "nearest", "--prior", "none", "--shell-ridge", 0)
    assert _reconstruct(dataset, tmp_path / "j", *options)[0] == 0
    table = read_particles(dataset)
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    settings = ReconstructionSettings(interp="nearest", prior="none", shell_ridge=0.0, epochs=0)
    everything = HalfSet(table, stack, grid, settings, half=1, dtype=torch.float64)
    expected = map_of(one_pass_map(everything, start(everything)), grid, "nearest")
    joint = read_map(tmp_path / "j" / "map.mrc")[0]
    np.testing.assert_allclose(joint, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    mean = (read_map(tmp_path / "j" / "half1.mrc")[0] + read_map(tmp_path / "j" / "half2.mrc")[0]) / 2
    assert np.abs(mean - expected).max() > 1e-2 * np.abs(expected).max()


def test_fourier_cropped_reconstruction_has_the_working_pixel_size(dataset, tmp_path):
    code, out = _reconstruct(dataset, tmp_path / "c", "--epochs", 3, "--box", 16, "--method", "pcg")
    assert code == 0, out
    cropped, pixel = read_map(tmp_path / "c" / "map.mrc")
    assert cropped.shape == (16, 16, 16) and pixel == pytest.approx(6.0, abs=1e-4)
    full = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(blob_phantom(32, seed=6, sigma_px=1.5))))
    coarse = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(full[8:24, 8:24, 8:24]))).real / 8  # (16/32)³
    assert correlation(cropped, coarse) > 0.75
    assert float(np.abs(cropped).max()) == pytest.approx(float(np.abs(coarse).max()), rel=0.3)


@pytest.mark.parametrize("method", ["algorithm1", "pcg"])
def test_resumed_run_equals_uninterrupted_run(dataset, tmp_path, method):
    assert _reconstruct(dataset, tmp_path / "full", "--epochs", 3, "--method", method)[0] == 0
    assert _reconstruct(dataset, tmp_path / "part", "--epochs", 1, "--method", method)[0] == 0
    code, out = _reconstruct(dataset, tmp_path / "part", "--epochs", 3, "--method", method, "--resume")
    assert code == 0, out
    for name in ("half1.mrc", "half2.mrc"):
        # equal up to float32 rounding: the parallel scatter adds in a non-deterministic order,
        # so two uninterrupted runs differ at this level too
        expected = read_map(tmp_path / "full" / name)[0]
        np.testing.assert_allclose(read_map(tmp_path / "part" / name)[0], expected, rtol=0,
                                   atol=1e-4 * np.abs(expected).max())


def test_run_killed_while_writing_a_checkpoint_keeps_the_previous_one(dataset, tmp_path, monkeypatch):
    """Killed in the middle of writing: the previous checkpoint stays whole (the write is atomic),
    Ctrl-C says how to continue, and continuing works."""
    assert _reconstruct(dataset, tmp_path / "k", "--epochs", 1)[0] == 0
    before = (tmp_path / "k" / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def killed_mid_write(payload, path):
        real_save(payload, path)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])  # a file cut short, as by a kill
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    code, out = _reconstruct(dataset, tmp_path / "k", "--epochs", 2, "--resume")
    assert code == 130 and out.strip().endswith("--epochs 2 --resume") and "interrupted" in out, out
    assert (tmp_path / "k" / "checkpoint.pt").read_bytes() == before
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)
    code, out = _reconstruct(dataset, tmp_path / "k", "--epochs", 2, "--resume")
    assert code == 0, out


def _edit_star(star, tmp_path, edit):
    table = read_particles(star)
    edit(table)
    table.image_name = [f"{n.split('@')[0]}@{star.parent / n.split('@')[1]}" for n in table.image_name]
    write_particles(tmp_path / "edited.star", table)
    return tmp_path / "edited.star"


@pytest.mark.parametrize("problem,expected", [
    ("no_angles", "missing column rlnAngleRot"),
    ("empty_half", "rlnRandomSubset: half-set 2 is empty"),
    ("odd_box", "--box 15: the working box must be even"),
    ("missing_stack", "missing.mrcs: file not found"),
    ("bad_method", "argument --method: invalid choice: 'newton'"),
])
def test_bad_input_is_a_one_line_error_with_nothing_written(dataset, tmp_path, problem, expected):
    star, extra = dataset, []
    if problem == "no_angles":
        star = _edit_star(dataset, tmp_path, lambda t: setattr(t, "angles_deg", None))
    elif problem == "empty_half":
        star = _edit_star(dataset, tmp_path, lambda t: t.random_subset.fill(1))
    elif problem == "missing_stack":
        star = _edit_star(dataset, tmp_path, lambda t: t.image_name.__setitem__(0, "1@missing.mrcs"))
    elif problem == "odd_box":
        extra = ["--box", 15]
    else:
        extra = ["--method", "newton"]
    code, out = _reconstruct(star, tmp_path / "out", *extra)
    assert code == 2 and out.startswith("error: ") and out.strip().count("\n") == 0 and expected in out, out
    assert not (tmp_path / "out").exists()


def test_fsc_command_matches_independent_computation(tmp_path):
    rng = np.random.default_rng(0)
    a = blob_phantom(24, seed=1)
    b = a + rng.normal(0, 0.05, a.shape).astype(np.float32)
    write_map(tmp_path / "a.mrc", a, 2.0)
    write_map(tmp_path / "b.mrc", b, 2.0)
    code, output = run_cli("fsc", tmp_path / "a.mrc", tmp_path / "b.mrc")
    assert code == 0, output
    rows = [line.split() for line in output.splitlines()[1:] if line.split()[0].isdigit()]
    fa, fb = np.fft.fftn(np.fft.ifftshift(a)), np.fft.fftn(np.fft.ifftshift(b))
    k = np.fft.fftfreq(24, 1 / 24)
    shell = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)
    for i, _, value in rows[1:]:
        sel = shell == int(i)
        expected = np.real(np.sum(fa[sel] * np.conj(fb[sel]))) / np.sqrt(np.sum(abs(fa[sel]) ** 2) * np.sum(abs(fb[sel]) ** 2))
        assert float(value) == pytest.approx(expected, abs=1e-4)
    assert "resolution at FSC 0.143" in output
