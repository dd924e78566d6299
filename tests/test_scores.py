import math

import pytest
import torch

from cryosgd.conventions import euler_to_matrix, ft_to_images, images_to_ft, map_to_ft
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import extract
from cryosgd.pose.scores import (TopPoses, band_mask, log_likelihoods, posterior_weights, restrict_to_band,
                                 score_poses)
from cryosgd.pose.shifts import local_shift_grid, phase_ramps, shift_grid


def _random_problem(box=16, batch=3, shifts=4, rotations=5, seed=0, per_particle_shifts=False):
    """Random half-grid map, images, smooth CTFs, shell-dependent noise weights, random shifts."""
    g = torch.Generator().manual_seed(seed)
    grid = FourierGrid.create(box, 2.0)
    freq_px, freq_invA = grid.freq_px, grid.freq_invA()
    volume_ft = torch.randn(*grid.volume_shape, generator=g, dtype=torch.complex128)
    angles = torch.rand(rotations, 3, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    k2 = (freq_px**2).sum(-1) / grid.radius_px**2
    defocus = 1 + 3 * torch.rand(batch, 1, generator=g, dtype=torch.float64)
    ctf = torch.sin(0.4 + 2 * math.pi * defocus * k2)
    sigma2 = 1 + 0.5 * torch.cos(grid.shell_px.double())
    images_ft = torch.randn(batch, freq_px.shape[0], generator=g, dtype=torch.complex128)
    shape = (batch, shifts, 2) if per_particle_shifts else (shifts, 2)
    shifts_A = 6 * torch.rand(*shape, generator=g, dtype=torch.float64) - 3
    return dict(volume_ft=volume_ft, rotations=euler_to_matrix(angles), shifts_A=shifts_A, images_ft=images_ft,
                ctf=ctf, weight=grid.multiplicity / sigma2, freq_px=freq_px, freq_invA=freq_invA)


def _direct_log_likelihoods(p, projections, scale=1.0):
    """(B, T, J) −½ Σ w |X − s C e^{+2πik·t} P|² + ½ Σ w |X|², vectorised, float64; s a number or (B, T, J, 1)."""
    k, t = p["freq_invA"], p["shifts_A"]
    phase = torch.exp(2j * math.pi * (t[..., None, 0] * k[:, 0] + t[..., None, 1] * k[:, 1]))  # (..., T, P)
    if phase.dim() == 2:
        phase = phase.expand(p["images_ft"].shape[0], -1, -1)
    x, c, w = p["images_ft"][:, None, None, :], p["ctf"][:, None, None, :], p["weight"]
    w = w[:, None, None, :] if w.dim() == 2 else w
    predicted = scale * c * phase[:, :, None, :] * projections[None, None]
    return -0.5 * (w * (x - predicted).abs() ** 2).sum(-1) + 0.5 * (w * x.abs() ** 2).sum(-1)


def _projections(p):
    return extract(p["volume_ft"], p["rotations"], p["freq_px"])


@pytest.mark.parametrize("per_particle", [False, True])
def test_gemm_log_likelihood_equals_direct_loop_in_float64(per_particle):
    p = _random_problem(per_particle_shifts=per_particle, seed=1)
    if per_particle:
        p["weight"] = p["weight"] * (1 + torch.rand(p["images_ft"].shape[0], 1, dtype=torch.float64))
    projections = _projections(p)
    got = log_likelihoods(p["images_ft"], p["ctf"], p["weight"], projections,
                          phase_ramps(p["freq_invA"], p["shifts_A"]))
    k = p["freq_invA"]
    expected = torch.empty_like(got)
    for i in range(got.shape[0]):
        w = p["weight"][i] if p["weight"].dim() == 2 else p["weight"]
        x, c = p["images_ft"][i], p["ctf"][i]
        for t in range(got.shape[1]):
            origin = p["shifts_A"][i, t] if per_particle else p["shifts_A"][t]
            phase = torch.exp(2j * math.pi * (k @ origin))
            for j in range(got.shape[2]):
                residual = x - c * phase * projections[j]
                expected[i, t, j] = -0.5 * (w * residual.abs() ** 2).sum() + 0.5 * (w * x.abs() ** 2).sum()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-9)


def test_scale_profiled_score_is_the_likelihood_at_the_best_nonnegative_scale():
    p = _random_problem(seed=2, shifts=3, rotations=7)
    projections = _projections(p)
    got = log_likelihoods(p["images_ft"], p["ctf"], p["weight"], projections,
                          phase_ramps(p["freq_invA"], p["shifts_A"]), scale_profiled=True)
    at_1, at_2 = _direct_log_likelihoods(p, projections, 1.0), _direct_log_likelihoods(p, projections, 2.0)
    norm = 2 * at_1 - at_2  # LL(s) = s·cross − ½ s²·norm
    best_scale = ((at_1 + norm / 2) / norm).clamp(min=0)
    peak = _direct_log_likelihoods(p, projections, best_scale[..., None])
    for step in (-0.05, 0.05):
        assert (_direct_log_likelihoods(p, projections, (best_scale + step).clamp(min=0)[..., None]) <= peak).all()
    torch.testing.assert_close(got, peak, rtol=1e-10, atol=1e-9)
    assert (got > 0).any() and (got == 0).any()


def _brute_force_top(scores, top_k):
    order = scores.argsort(dim=1, descending=True)[:, :top_k]
    return scores.gather(1, order), order


@pytest.mark.parametrize("prior, scale_profiled", [(False, False), (True, False), (False, True), (True, True)])
def test_top_k_matches_brute_force_argsort_and_is_independent_of_chunking(prior, scale_profiled):
    p = _random_problem(batch=4, shifts=5, rotations=23, seed=3)
    log_prior = -torch.rand(4, 5, dtype=torch.float64) if prior else None
    block = _direct_log_likelihoods(p, _projections(p))
    if scale_profiled:
        at_2 = _direct_log_likelihoods(p, _projections(p), 2.0)
        norm = 2 * block - at_2
        block = (block + norm / 2).clamp(min=0) ** 2 / (2 * norm)
    if prior:
        block = block + log_prior[:, :, None]
    best_shift_scores, best_shift = block.max(1)
    scores, rotation = _brute_force_top(best_shift_scores, 6)
    for chunk in (None, 1, 4):
        top = score_poses(**p, top_k=6, chunk_rotations=chunk, log_prior=log_prior, scale_profiled=scale_profiled)
        torch.testing.assert_close(top.log_likelihood, scores, rtol=1e-10, atol=1e-9)
        assert torch.equal(top.rotation_index, rotation)
        assert torch.equal(top.shift_index, best_shift.gather(1, rotation))
        assert top.log_evidence is None


def test_logsumexp_reduction_and_evidence_match_brute_force_in_float64():
    p = _random_problem(batch=3, shifts=4, rotations=11, seed=4, per_particle_shifts=True)
    p["images_ft"] = p["images_ft"] * 0.1  # keep the scores of order 1 so that no pose dominates
    log_prior = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), 1)
    block = _direct_log_likelihoods(p, _projections(p)) + log_prior[:, :, None]
    scores, rotation = _brute_force_top(torch.logsumexp(block, 1), 4)
    top = score_poses(**p, top_k=4, reduce="logsumexp", chunk_rotations=3, log_prior=log_prior)
    torch.testing.assert_close(top.log_likelihood, scores, rtol=1e-12, atol=1e-10)
    assert torch.equal(top.rotation_index, rotation)
    assert torch.equal(top.shift_index, block.argmax(1).gather(1, rotation))
    torch.testing.assert_close(top.log_evidence, torch.logsumexp(block.flatten(1), 1), rtol=1e-12, atol=1e-10)


def test_top_k_larger_than_the_grid_keeps_every_rotation():
    p = _random_problem(rotations=3, seed=5)
    top = score_poses(**p, top_k=8)
    assert top.rotation_index.shape == (3, 3)
    assert torch.equal(top.rotation_index.sort(1).values, torch.arange(3).expand(3, 3))


def test_pure_noise_images_give_one_chi_square_degree_per_full_plane_frequency():
    box, noise_std = 16, 0.7
    grid = FourierGrid.create(box, 2.0)
    g = torch.Generator().manual_seed(6)
    images_ft = grid.take(images_to_ft(noise_std * torch.randn(600, box, box, generator=g, dtype=torch.float64)))
    weight = grid.multiplicity / (box**2 * noise_std**2)  # E|n_k|² = box² · pixel variance
    ones = torch.ones_like(images_ft.real)
    self_scores = log_likelihoods(images_ft, ones, weight, images_ft, torch.ones_like(images_ft[:1]))
    chi_square = 2 * self_scores[:, 0].diagonal()  # LL of the image against itself = ½ Σ w |X|²
    assert abs(chi_square.mean() / grid.multiplicity.sum() - 1) < 0.02


def _blob_map(box, seed):
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(10, 3, generator=g) - 0.5) * box / 2
    amplitudes = 0.5 + torch.rand(10, generator=g)
    axis = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    volume = sum(a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 1.5**2))
                 for a, (cx, cy, cz) in zip(amplitudes, centres))
    return map_to_ft(volume)


def _simulated_particles(scale, seed=7, box=24, pixel_A=2.0, batch=40, rotations=150):
    """float32 particles at grid rotations, moved in real space by integer-pixel origins, with noise."""
    g = torch.Generator().manual_seed(seed)
    grid = FourierGrid.create(box, pixel_A)
    volume_ft = _blob_map(box, seed)
    angles = torch.rand(rotations, 3, generator=g) * torch.tensor([360.0, 180.0, 360.0])
    rotation_grid = euler_to_matrix(angles.double()).float()
    shifts_A = shift_grid(2 * pixel_A, pixel_A, dtype=torch.float32)
    true_rotation = torch.randint(rotations, (batch,), generator=g)
    true_shift = torch.randint(shifts_A.shape[0], (batch,), generator=g)
    k2 = (grid.freq_px**2).sum(-1).float() / grid.radius_px**2
    ctf = torch.sin(0.5 + 2 * math.pi * (1 + 2 * torch.rand(batch, 1, generator=g)) * k2)
    clean = ctf * extract(volume_ft, rotation_grid[true_rotation], grid.freq_px.float())
    images = ft_to_images(grid.put(clean, box), box)
    origins_px = (shifts_A[true_shift] / pixel_A).round().long()
    images = torch.stack([torch.roll(im, (-int(o[1]), -int(o[0])), (-2, -1)) for im, o in zip(images, origins_px)])
    noise_std = 0.5 * float(images.std()) * scale
    noisy = scale * images + noise_std * torch.randn(images.shape, generator=g)
    inputs = dict(volume_ft=volume_ft, rotations=rotation_grid, shifts_A=shifts_A,
                  images_ft=grid.take(images_to_ft(noisy)), ctf=ctf,
                  weight=(grid.multiplicity / (box**2 * noise_std**2)).float(),
                  freq_px=grid.freq_px, freq_invA=grid.freq_invA())
    return inputs, true_rotation, true_shift


@pytest.mark.parametrize("scale, scale_profiled", [(1.0, False), (0.3, True)])
def test_best_pose_over_grid_recovers_the_simulated_pose(scale, scale_profiled):
    inputs, true_rotation, true_shift = _simulated_particles(scale)
    top = score_poses(**inputs, top_k=2, scale_profiled=scale_profiled, chunk_rotations=64)
    assert top.log_likelihood.dtype == torch.float32
    correct = (top.rotation_index[:, 0] == true_rotation) & (top.shift_index[:, 0] == true_shift)
    assert correct.float().mean() >= 0.95


def test_posterior_weights_sum_to_one_and_keep_the_smallest_set_holding_the_mass():
    probabilities = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.97, 0.01, 0.01, 0.01]], dtype=torch.float64)
    top = TopPoses(probabilities.log() + 3.0, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    weights = posterior_weights(top.log_likelihood, mass=0.9)
    torch.testing.assert_close(weights[0], torch.tensor([0.0, 0.5, 0.15, 0.3], dtype=torch.float64) / 0.95)
    torch.testing.assert_close(weights[1], torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(posterior_weights(top.log_likelihood, mass=1.0), probabilities)
    tempered = posterior_weights(top.log_likelihood, temperature=2.0, mass=1.0)
    torch.testing.assert_close(tempered, torch.softmax(top.log_likelihood / 2, 1))
    torch.testing.assert_close(tempered.sum(1), torch.ones(2, dtype=torch.float64))


def test_posterior_weights_name_the_particle_with_a_non_finite_score():
    scores = torch.tensor([[1.0, 0.0], [-torch.inf, 0.0], [torch.nan, 0.0]])
    index = torch.zeros(3, 2, dtype=torch.long)
    weights = posterior_weights(scores[:2])
    assert weights[1].tolist() == [0.0, 1.0]
    with pytest.raises(InputError, match="particle 2"):
        posterior_weights(scores)
    with pytest.raises(InputError, match="particle 17"):
        posterior_weights(scores, particle_ids=torch.tensor([15, 16, 17]))


def test_band_restriction_keeps_the_disc_of_the_radius():
    grid = FourierGrid.create(16, 2.0)
    mask = band_mask(grid.freq_px, 4.0)
    assert int(mask.sum()) == int(((grid.freq_px**2).sum(-1) <= 16).sum()) and not mask.all()
    images, ctf, weight, freq_px, freq_invA = restrict_to_band(
        mask, torch.ones(3, len(mask), dtype=torch.complex64), torch.ones(3, len(mask)), grid.multiplicity,
        grid.freq_px, grid.freq_invA())
    assert images.shape == ctf.shape == (3, int(mask.sum())) and weight.shape == (int(mask.sum()),)
    assert freq_px.norm(dim=-1).max() <= 4.0 and freq_invA.shape == freq_px.shape


def test_shift_grid_is_a_clipped_square_grid_holding_its_centre():
    grid = shift_grid(4.0, 2.0)
    assert grid.shape == (13, 2) and grid.norm(dim=-1).max() <= 4.0
    assert (grid == 0).all(-1).sum() == 1
    assert torch.equal(shift_grid(0.0, 1.0, centre_A=[1.5, -2.0]), torch.tensor([[1.5, -2.0]], dtype=torch.float64))
    centres = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    batched = shift_grid(1.0, 1.0, centre_A=centres)
    assert batched.shape == (2, 5, 2) and torch.equal(batched[1] - batched[0], centres[1].double().expand(5, 2))
    local = local_shift_grid(centres, 0.5)
    assert local.shape == (2, 9, 2) and torch.equal(local[:, 4], centres)
    assert torch.equal(local[1, 0], torch.tensor([2.5, 0.5]))


def test_phase_ramps_are_exp_plus_two_pi_i_k_dot_t_with_batch_dimensions():
    freq_invA = FourierGrid.create(16, 2.0).freq_invA()
    shifts_A = torch.randn(2, 3, 2, dtype=torch.float64)
    expected = torch.exp(2j * math.pi * (shifts_A @ freq_invA.T))
    torch.testing.assert_close(phase_ramps(freq_invA, shifts_A), expected)
