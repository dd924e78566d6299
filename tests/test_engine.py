"""The engine: immutable batches, composable optimisers, the particle store, one pass per epoch,
reproducible decisions, and the automatic number of epochs."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from cryosgd.analysis.convergence import start
from cryosgd.conventions import euler_to_matrix
from cryosgd.data.batch import Batch, CTFParams, make_batch
from cryosgd.data.particles import read_particles
from cryosgd.data.stack import ImageStack
from cryosgd.data.store import ParticleStore
from cryosgd.fourier.grids import FourierGrid
from cryosgd.io.mrc import read_map, write_map
from cryosgd.model.forward import ForwardModel
from cryosgd.objective.diagonal import exact_diagonal
from cryosgd.objective.loss import LeastSquares
from cryosgd.optim.base import Step, chain, inner
from cryosgd.optim.linesearch import Armijo
from cryosgd.optim.precondition import ScaleByHutchinson
from cryosgd.recon.halves import HalfSet
from cryosgd.recon.known_pose import run_epoch
from cryosgd.recon.settings import ReconstructionSettings
from cryosgd.sim.phantom import blob_phantom
from cryosgd.sim.simulate import SimulationSettings, simulate

from conftest import run_cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    write_map(root / "truth.mrc", blob_phantom(24, seed=6, sigma_px=1.5), 3.0)
    simulate(root / "truth.mrc", root / "sim", SimulationSettings(n_particles=400, snr=0.3, seed=4))
    return root / "sim" / "particles.star"


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = FourierGrid.create(16, 2.0)
    angles = torch.rand(n, 3, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    ones = torch.ones(n, dtype=torch.float64)
    ctf = CTFParams(ones * 15000, ones * 14000, ones * 30, ones * 300, ones * 2.7, ones * 0.1, ones * 0, ones * 0, ones)
    shifts = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3
    images = torch.randn(n, len(grid.freq_px), generator=g, dtype=torch.complex128)
    volume = torch.randn(grid.volume_shape, generator=g, dtype=torch.complex128)
    return grid, Batch(np.arange(n), euler_to_matrix(angles), shifts, ctf, images), volume


# Immutable batches ------------------------------------------------------------------------------

def test_a_new_shift_or_rotation_changes_the_prediction():
    grid, batch, volume = _batch()
    model = ForwardModel(grid)
    before = model.forward(volume, batch)
    moved = batch.with_poses(batch.rotations, batch.shift_A + 1.0)
    turned = dataclasses.replace(batch, rotations=euler_to_matrix(torch.tensor([[10.0, 20.0, 30.0]] * 5,
                                                                                dtype=torch.float64)))
    for other in (moved, turned):
        expected = ForwardModel(grid).forward(volume, dataclasses.replace(other))  # a fresh batch, nothing cached
        torch.testing.assert_close(model.forward(volume, other), expected)
        assert (model.forward(volume, other) - before).abs().max() > 1e-3 * before.abs().max()
    torch.testing.assert_close(model.forward(volume, batch), before)


def test_batches_cannot_be_changed_and_in_place_edits_are_not_served_stale():
    grid, batch, volume = _batch()
    model = ForwardModel(grid)
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.shift_A = batch.shift_A + 1
    before = model.forward(volume, batch)
    batch.shift_A.add_(1.0)  # a caller that edits a tensor in place still gets a fresh value
    assert (model.forward(volume, batch) - before).abs().max() > 1e-3 * before.abs().max()


def test_rows_taken_from_a_batch_are_modelled_as_a_batch_built_from_scratch():
    """(image, pose) rows gather their CTF values from the images' batch: the prediction equals
    that of the same rows built afresh, for particles of different defoci."""
    grid, batch, volume = _batch(n=4)
    batch = dataclasses.replace(batch, ctf=dataclasses.replace(batch.ctf, defocus_u_A=torch.tensor(
        [8000.0, 12000.0, 16000.0, 20000.0], dtype=torch.float64)))
    model = ForwardModel(grid)
    model.forward(volume, batch)  # the images' CTF values are cached on the batch first
    rows = torch.tensor([3, 0, 3, 1, 2])
    g = torch.Generator().manual_seed(3)
    taken = batch.take(rows).with_poses(euler_to_matrix(torch.rand(5, 3, generator=g, dtype=torch.float64) * 90),
                                        torch.randn(5, 2, generator=g, dtype=torch.float64))
    fresh = Batch(taken.index, taken.rotations, taken.shift_A, batch.ctf.take(rows), taken.images_ft)
    torch.testing.assert_close(model.forward(volume, taken), ForwardModel(grid).forward(volume, fresh))
    taken.ctf.defocus_u_A.add_(500.0)  # edited in place: no longer the source's values
    fresh.ctf.defocus_u_A.add_(500.0)
    torch.testing.assert_close(model.forward(volume, taken), ForwardModel(grid).forward(volume, fresh))
    other = batch.ctf.take(torch.tensor([0, 0, 1, 1, 2]))  # CTF parameters replaced on the rows
    torch.testing.assert_close(model.forward(volume, dataclasses.replace(taken, ctf=other)),
                               ForwardModel(grid).forward(volume, dataclasses.replace(fresh, ctf=other)))
    again = batch.take(rows)
    batch.ctf.defocus_v_A.add_(900.0)  # the parent edited in place after the rows were taken
    torch.testing.assert_close(model.forward(volume, again), ForwardModel(grid).forward(volume, dataclasses.replace(
        again, ctf=dataclasses.replace(again.ctf, defocus_u_A=again.ctf.defocus_u_A.clone()))))


# Optimisers as transforms -----------------------------------------------------------------------

def test_armijo_decides_as_the_loss_comparison_in_float64_would():
    """½η⟨p,Hp⟩ ≤ (1−c)⟨g,p⟩ is the paper's f(x − ηp) ≤ f(x) − cη⟨g,p⟩ for a quadratic f."""
    grid, batch, x = _batch(n=8, seed=3)
    objective = LeastSquares(ForwardModel(grid), ridge=1e-3)
    loss, gradient = objective.loss_and_gradient(x, batch)
    direction = gradient / exact_diagonal(objective, batch, torch.float64)
    curvature = inner(direction, objective.hvp(direction, batch))
    decrease = inner(gradient, direction)
    for eta in np.geomspace(1e-3, 1e3, 40):
        by_loss = float(objective.loss(x - eta * direction, batch)) <= float(loss) - 0.99 * eta * decrease
        assert by_loss == (0.5 * eta * curvature <= 0.01 * decrease), eta
    step = Step(gradient, None, None, lambda p: inner(p, objective.hvp(p, batch)), new_epoch=True)
    update, state, info = Armijo(eta_max=10.0, growth=1.2).update(direction, Armijo().init(x), step)
    eta = info["step_size"]
    assert 0.5 * eta * curvature <= 0.01 * decrease < 0.5 * (2 * eta) * curvature  # the largest accepted
    torch.testing.assert_close(update, -eta * direction)


def test_algorithm1_is_hutchinson_then_armijo():
    grid, batch, x = _batch(n=6, seed=4)
    objective = LeastSquares(ForwardModel(grid), ridge=1e-3)
    optimizer = chain(ScaleByHutchinson(beta=0.5, alpha=1e-6, d0=2.0), Armijo(eta_max=10.0, growth=1.2))
    state = optimizer.init(x)
    z = optimizer.probe(state, torch.Generator().manual_seed(0))
    _, gradient = objective.loss_and_gradient(x, batch)
    hz = objective.hvp(z, batch)
    step = Step(gradient, z, hz, lambda p: inner(p, objective.hvp(p, batch)), new_epoch=True)
    update, (hutchinson, armijo), info = optimizer.update(gradient, state, step)
    d = 0.5 * 2.0 + 0.5 * 0.5 * (z.real * hz.real + z.imag * hz.imag)
    torch.testing.assert_close(hutchinson.d, d)
    torch.testing.assert_close(update, -info["step_size"] * gradient / d.abs().clamp(min=1e-6))


def test_a_forgetting_diagonal_follows_a_hessian_that_moves():
    """When the poses (hence H) change, the running mean of all probes lags; forgetting follows."""
    x = torch.zeros(4, 4, 3, dtype=torch.complex128)
    first, second = torch.full(x.shape, 1.0, dtype=torch.float64), torch.full(x.shape, 3.0, dtype=torch.float64)
    means = {}
    for forget in (None, 0.8):
        transform, state = ScaleByHutchinson(beta=0.0, forget=forget), None
        state = transform.init(x)
        for k in range(60):
            h = first if k < 30 else second
            z = transform.probe(state, torch.Generator().manual_seed(k))
            _, state, _ = transform.update(x, state, Step(x, z, h * z, lambda p: 0.0, False))
        means[forget] = float(state.mean.mean())
    assert means[None] == pytest.approx(2.0, abs=1e-9)  # the mean of 30 probes of 1 and 30 of 3
    assert means[0.8] == pytest.approx(3.0, abs=0.01)


# The particle store and the passes over the data -----------------------------------------------------

def test_the_store_gives_the_same_images_in_memory_on_disk_and_in_bfloat16(dataset):
    table = read_particles(dataset)
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    index = np.array([5, 3, 99, 0])
    disk = ParticleStore(stack, grid, "disk").images(index)
    memory = ParticleStore(stack, grid, "memory")
    torch.testing.assert_close(memory.images(index), disk)
    torch.testing.assert_close(memory.images(index), disk)  # now from memory
    half = ParticleStore(stack, grid, "memory", torch.bfloat16).images(index)
    assert float((half - disk).abs().max() / disk.abs().max()) < 1e-2
    batches = [np.arange(i, i + 7) for i in range(0, 70, 7)]
    for (index, images), expected in zip(ParticleStore(stack, grid, "disk").batches(batches), batches):
        np.testing.assert_array_equal(index, expected)
        torch.testing.assert_close(images, memory.images(expected))


def test_epochs_read_no_image_again_and_compute_no_extra_pass(dataset, monkeypatch):
    """With the images in memory, the first pass reads every image once; an epoch then makes
    one step per batch and no other pass (its loss comes from the steps' batches)."""
    table = read_particles(dataset)
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    settings = ReconstructionSettings(batch_size=100, store="memory")
    half = HalfSet(table, stack, grid, settings, half=1)
    reads, passes = [], []
    real_read, real_parts = ImageStack.read, HalfSet.parts
    monkeypatch.setattr(ImageStack, "read", lambda self, index: reads.append(len(index)) or real_read(self, index))
    monkeypatch.setattr(HalfSet, "parts", lambda self, epoch: passes.append(epoch) or real_parts(self, epoch))
    state = start(half)
    assert sum(reads) == len(table) and passes == [None]
    state, metrics = run_epoch(half, state, 1)
    state, metrics = run_epoch(half, state, 2)
    assert sum(reads) == len(table) and passes == [None, 1, 2]
    assert np.isfinite(metrics["loss"]) and metrics["map_change"] > 0


def test_a_half_within_a_band_is_the_whole_half_with_the_frequencies_beyond_weighted_zero(dataset):
    """`HalfSet.within(r)` crops images and model to |k| ≤ r: its data terms (b, diag(H), H·1)
    under a noise spectrum equal those of the whole disc with its weights set to 0 beyond r,
    and no voxel beyond the band's trilinear reach is touched."""
    table = read_particles(dataset)
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    whole = HalfSet(table, stack, grid, ReconstructionSettings(batch_size=150), half=1, dtype=torch.float64)
    radius = 5.5
    band = whole.within(radius)
    assert len(band.grid.freq_px) < len(grid.freq_px) and whole.within(grid.radius_px) is whole
    sigma2 = 1.0 + torch.rand(1, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zero_beyond = ((grid.freq_px**2).sum(-1) <= radius**2).double()[None]
    weighted = LeastSquares(whole.model, 0.0, whole.noise_weight(sigma2) * zero_beyond)
    expected = [weighted.data_terms(b) for b in whole.parts(None)]
    cropped = [LeastSquares(band.model, 0.0, band.noise_weight(sigma2)).data_terms(b) for b in band.parts(None)]
    assert len(cropped) == len(expected)
    for got, want in zip(cropped, expected):
        for name in ("c", "b", "diagonal", "density"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name))
    narrower = [LeastSquares(b.model, 0.0).data_terms(x) for b in (band.within(3.5), whole.within(3.5))
                for x in b.parts(None)]  # a band within a band: the same as within the whole
    for got, want in zip(narrower[:len(cropped)], narrower[len(cropped):]):
        torch.testing.assert_close(got.b, want.b)
    radius_3d = torch.fft.fftfreq(grid.work_box_px, 1 / grid.work_box_px).abs()
    beyond = (radius_3d[:, None, None] > radius + 2) | (radius_3d[None, :, None] > radius + 2)
    assert cropped[0].density[beyond.expand_as(cropped[0].density)].abs().max() == 0


# Reproducible runs and the automatic epoch count ----------------------------------------------------

def _map(folder, name="half1.mrc"):
    return read_map(folder / name)[0]


def test_identical_runs_give_the_same_maps_to_float32_rounding(dataset, tmp_path):
    for name in ("a", "b"):
        code, out = run_cli("reconstruct", dataset, "-o", tmp_path / name, "--epochs", 4, "--batch-size", 50)
        assert code == 0, out
    for name in ("half1.mrc", "half2.mrc"):
        a, b = _map(tmp_path / "a", name), _map(tmp_path / "b", name)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_automatic_epochs_stop_at_the_first_step_that_lowers_the_half_map_fsc(dataset, tmp_path):
    """From the one-pass map, a step that lowers the half-map FSC ends the run with the maps of
    the first pass, exactly those of ``--epochs 0``; from zero, the FSC rises over epochs
    (each epoch kept raised it) until a step lowers it."""
    code, out = run_cli("reconstruct", dataset, "-o", tmp_path / "auto", "--batch-size", 50)
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert "keeping the maps of the first pass" in out and rows[-1]["fsc_mean"] <= rows[0]["fsc_mean"]
    assert rows[-1]["steps"] == 1  # one pair of steps was enough to see it
    assert run_cli("reconstruct", dataset, "-o", tmp_path / "zero_epochs", "--batch-size", 50, "--epochs", 0)[0] == 0
    np.testing.assert_array_equal(_map(tmp_path / "auto"), _map(tmp_path / "zero_epochs"))
    code, out = run_cli("reconstruct", dataset, "-o", tmp_path / "from_zero", "--batch-size", 50, "--start", "zero")
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "from_zero" / "metrics.jsonl").read_text().splitlines()]
    fsc = [row["fsc_mean"] for row in rows if row["half"] == 1]
    assert len(fsc) >= 3 and all(b > a for a, b in zip(fsc[:-2], fsc[1:-1]))  # the epochs helped
    assert "stopping: the half-map FSC no longer rises" in out


def test_a_batch_split_across_ranks_sums_to_the_whole(dataset, monkeypatch):
    """What each rank computes on its share adds up to the single-process sums (the all-reduce
    itself is tested with two real processes in test_distributed.py)."""
    import cryosgd.dist as dist
    table = read_particles(dataset)
    stack = ImageStack(table)
    grid = FourierGrid.create(stack.box_px, table.pixel_A)
    settings = ReconstructionSettings(batch_size=64)
    whole = HalfSet(table, stack, grid, settings, half=1, dtype=torch.float64)
    objective = LeastSquares(whole.model, 1e-4)
    x = start(whole).x
    expected = [objective.data_gradients(x, b).gradient for b in whole.parts(3)]
    shares = []
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    for rank in range(3):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        part = HalfSet(table, stack, grid, settings, half=1, dtype=torch.float64)
        shares.append([objective.data_gradients(x, b).gradient for b in part.parts(3)])
    for k, total in enumerate(expected):
        torch.testing.assert_close(sum(share[k] for share in shares), total)
