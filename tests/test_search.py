"""Global and local pose search on projections of a known map."""

import math

import numpy as np
import pytest
import torch

from cryosgd.conventions import map_to_ft
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import extract
from cryosgd.pose.scores import band_mask
from cryosgd.pose.search import BandImages, Candidates, global_search, local_search, posterior_grid
from cryosgd.pose.shifts import phase_ramps, shift_grid
from cryosgd.pose.so3 import cube_offsets, exp_map, geodesic_distance_deg, random_rotations, uniform_rotations
from cryosgd.sim.phantom import blob_phantom

BOX, PIXEL_A = 32, 3.0


def _images(n, noise, seed=0, band=None):
    """Projections of a blob map at random poses and origins, with CTFs and white noise."""
    g = torch.Generator().manual_seed(seed)
    grid = FourierGrid.create(BOX, PIXEL_A)
    volume_ft = map_to_ft(torch.tensor(blob_phantom(BOX, seed=3, sigma_px=1.5), dtype=torch.float64))
    rotations = random_rotations(n, g)
    shifts = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 8
    freq_px, freq_invA = grid.freq_px, grid.freq_invA()
    s2 = (freq_invA**2).sum(-1)
    defocus = 1e4 * (1 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    ctf = -torch.sin(math.pi * 0.0197 * defocus * s2 - 0.1)  # a plain CTF-like modulation
    clean = ctf * phase_ramps(freq_invA, shifts[:, None])[:, 0] * extract(volume_ft, rotations, freq_px)
    sigma = noise * clean.abs().pow(2).mean().sqrt()
    images = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.complex128)
    keep = band_mask(freq_px, band or BOX / 2 - 1)
    weight = grid.multiplicity[keep] / sigma**2
    band_images = BandImages(images[:, keep], ctf[:, keep], weight.expand(n, -1), freq_px[keep], freq_invA[keep])
    return volume_ft, band_images, rotations, shifts


def test_global_search_finds_the_nearest_grid_pose_and_the_shift():
    volume_ft, images, truth, shifts = _images(20, noise=0.3, band=8)
    grid = uniform_rotations(1)
    found = global_search(volume_ft, images, grid.matrices, shift_grid(6.0, 3.0), top_k=4)
    error = geodesic_distance_deg(found.rotations[:, 0], truth)
    # the order-1 grid (30°) has a covering radius of ≈ 25° and a median nearest distance of ≈ 15°
    assert float(error.median()) < 20 and float((error < 30).double().mean()) >= 0.85
    assert (found.log_likelihood[:, :-1] >= found.log_likelihood[:, 1:]).all()


@pytest.mark.parametrize("radius_A", [None, 60.0])  # 60 Å: the first level (4°) scores 11 of 15 shells
@pytest.mark.parametrize("noise,levels,median_deg", [(0.05, 6, 0.3), (0.5, 4, 1.2)])
def test_local_search_refines_poses_well_below_its_first_step(noise, levels, median_deg, radius_A):
    volume_ft, images, truth, shifts = _images(40, noise=noise, seed=1)
    g = torch.Generator().manual_seed(5)
    kick = torch.randn(40, 3, generator=g, dtype=torch.float64)
    kick = kick / kick.norm(dim=-1, keepdim=True) * math.radians(5.0)
    start = Candidates((truth @ exp_map(kick))[:, None], (shifts + 1.5)[:, None], torch.zeros(40, 1))
    refined, sigma = local_search(volume_ft, images, start, step_deg=4.0, step_A=2.0, levels=levels,
                                  radius_A=radius_A)
    error = geodesic_distance_deg(refined.rotations[:, 0], truth)
    assert float(error.median()) < median_deg and float(error.max()) < 3.0
    assert float((refined.shift_A[:, 0] - shifts).norm(dim=-1).median()) < 0.2
    if noise >= 0.5:  # noise-limited: the curvature's accuracy estimate is calibrated (for an
        # isotropic Gaussian error of std σ per axis the median geodesic error is ≈ 1.54 σ)
        ratio = float(error.median()) / (1.54 * float(sigma.median()))
        assert 0.6 < ratio < 1.6, ratio
    before = local_search(volume_ft, images, start, step_deg=4.0, step_A=2.0, levels=0)[0].log_likelihood
    assert (refined.log_likelihood > before).all()


def test_local_search_refines_only_the_live_candidates(monkeypatch):
    """Candidates marked dead keep their poses with log-likelihood −inf, unsearched; the live
    ones end exactly where a search of all candidates puts them."""
    import cryosgd.pose.search as search
    volume_ft, images, truth, shifts = _images(12, noise=0.3, seed=2)
    g = torch.Generator().manual_seed(7)
    kicks = torch.randn(12, 2, 3, generator=g, dtype=torch.float64) * math.radians(3.0)
    start = Candidates(truth[:, None] @ exp_map(kicks), shifts[:, None].expand(12, 2, 2).clone(), torch.zeros(12, 2))
    live = torch.ones(12, 2, dtype=torch.bool)
    live[::3, 1] = False
    every, every_sigma = local_search(volume_ft, images, start, step_deg=4.0, step_A=2.0, levels=2)
    scored = []
    real_star_scores = search._star_scores
    monkeypatch.setattr(search, "_star_scores", lambda v, images, rotations, *a, **k: scored.append(
        rotations.shape[0] * rotations.shape[1]) or real_star_scores(v, images, rotations, *a, **k))
    some, some_sigma = local_search(volume_ft, images, start, step_deg=4.0, step_A=2.0, levels=2, live=live)
    assert sum(scored) == 3 * int(live.sum())  # two levels and the final score, of live candidates only
    torch.testing.assert_close(some.rotations[live], every.rotations[live])
    torch.testing.assert_close(some.log_likelihood[live], every.log_likelihood[live])
    torch.testing.assert_close(some_sigma[live], every_sigma[live])
    assert torch.equal(some.rotations[~live], start.rotations[~live]) and torch.equal(some.shift_A[~live],
                                                                                     start.shift_A[~live])
    assert bool((some.log_likelihood[~live] == -torch.inf).all()) and bool((some_sigma[~live] == math.inf).all())


def test_local_search_levels_score_the_band_their_step_resolves(monkeypatch):
    """With the particle's radius R, a level of step h but the last scores |k| ≤ 1/(2Rh); the
    last level and the final scores use the whole band."""
    import cryosgd.pose.search as search
    volume_ft, images, truth, shifts = _images(4, noise=0.1, seed=2)
    seen = []

    def recording(volume_ft, band_images, rotations, shifts, h, s, interp, centre_only=False):
        seen.append((h, float(band_images.freq_invA.norm(dim=1).max()), band_images.images_ft.shape[1]))
        return star_scores(volume_ft, band_images, rotations, shifts, h, s, interp, centre_only)

    star_scores = search._star_scores
    monkeypatch.setattr(search, "_star_scores", recording)
    start = Candidates(truth[:, None], shifts[:, None], torch.zeros(4, 1))
    local_search(volume_ft, images, start, step_deg=32.0, step_A=2.0, levels=3, radius_A=40.0)
    whole = float(images.freq_invA.norm(dim=1).max())  # 15 shells of a 96 Å box
    for h, reach, _ in seen[:2]:  # 32°, 16°: 2.2 and 4.3 shells
        assert 1 / (2 * 40.0 * h) - 1 / (BOX * PIXEL_A) <= reach <= 1 / (2 * 40.0 * h)
    assert seen[0][2] < seen[1][2] < seen[2][2] == seen[3][2] == images.images_ft.shape[1]
    assert seen[2][1] == seen[3][1] == whole  # the last level (its curvature: the accuracy) and the final scores


def test_global_search_with_origins_per_image_agrees_with_shared_origins():
    volume_ft, images, truth, shifts = _images(12, noise=0.3, band=8)
    grid = uniform_rotations(1).matrices
    shared = shift_grid(3.0, 1.5)
    per_image = shared.expand(12, -1, -1).clone()
    a = global_search(volume_ft, images, grid, shared, top_k=3, chunk=5)
    b = global_search(volume_ft, images, grid, per_image, top_k=3, chunk=5)
    for x, y in zip((a.rotations, a.shift_A, a.log_likelihood), (b.rotations, b.shift_A, b.log_likelihood)):
        torch.testing.assert_close(x, y)


def test_star_scores_equal_the_log_likelihood_of_each_pose_computed_alone():
    """The local search's (pose, star rotation, shift offset) scores against a float64
    per-pose evaluation of −½ Σ w |X − C e^{2πik·t} P|² + ½ Σ w |X|²."""
    from cryosgd.pose.search import _SHIFTS, _STAR, _star_scores
    volume_ft, images, rotations, shifts = _images(3, noise=0.5, seed=4)
    g = torch.Generator().manual_seed(5)
    poses = rotations[:, None] @ exp_map(0.05 * torch.randn(3, 2, 3, generator=g, dtype=torch.float64))
    origins = shifts[:, None] + torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    h, s = 0.03, 0.7
    scores = _star_scores(volume_ft, images, poses, origins, h, s, "trilinear")
    for b in range(3):
        for k in range(2):
            for j, offset in enumerate(_SHIFTS):
                for r, axis in enumerate(_STAR):
                    rotation = poses[b, k] @ exp_map(h * torch.tensor(axis, dtype=torch.float64))
                    origin = origins[b, k] + s * torch.tensor(offset, dtype=torch.float64)
                    model = images.ctf[b] * phase_ramps(images.freq_invA, origin[None])[0] * extract(
                        volume_ft, rotation[None], images.freq_px)[0]
                    x = images.images_ft[b]
                    expected = 0.5 * (images.weight[b] * (x.abs() ** 2 - (x - model).abs() ** 2)).sum()
                    torch.testing.assert_close(scores[b, k, j, r], expected, rtol=1e-9, atol=1e-9)


def test_posterior_grid_keeps_the_most_likely_rotations_of_the_grid_around_each_pose():
    """Each particle's kept poses are the best of the 19 grid rotations (the 3³ cube at its own
    step without its corners) at its origin, each scored alone (float64), best first."""
    volume_ft, images, rotations, shifts = _images(3, noise=0.5, seed=6)
    steps_deg, keep = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), 5
    start = Candidates(rotations[:, None], shifts[:, None], torch.zeros(3, 1, dtype=torch.float64))
    found = posterior_grid(volume_ft, images, start, steps_deg, keep=keep,
                           max_block_elements=2 * 19 * len(images.freq_px))  # two images a chunk
    x = images.images_ft
    for b in range(3):
        scored = []
        for c in cube_offsets(1, dtype=torch.float64):
            if c.abs().sum() == 3:
                continue
            rotation = rotations[b] @ exp_map(math.radians(float(steps_deg[b])) * c)
            model = images.ctf[b] * phase_ramps(images.freq_invA, shifts[b][None])[0] * extract(
                volume_ft, rotation[None], images.freq_px)[0]
            value = 0.5 * (images.weight[b] * (x[b].abs() ** 2 - (x[b] - model).abs() ** 2)).sum()
            scored.append((float(value), rotation))
        assert len(scored) == 19
        best = sorted(scored, key=lambda item: -item[0])[:keep]
        torch.testing.assert_close(found.log_likelihood[b], torch.tensor([v for v, _ in best], dtype=torch.float64))
        torch.testing.assert_close(found.rotations[b], torch.stack([r for _, r in best]))
        torch.testing.assert_close(found.shift_A[b], shifts[b].expand(keep, 2))


def test_the_particle_radius_is_the_farthest_voxel_of_the_mask():
    """A soft sphere of radius 10 with a 3-pixel cosine edge is above 1 % out to 12.8 pixels;
    a mask off centre reaches as far as its farthest voxel."""
    from cryosgd.fourier.maps import soft_sphere, support_radius_px
    radius = support_radius_px(soft_sphere(32, 10.0, edge_px=3.0))
    assert 12.5 <= radius <= 12.81
    mask = torch.zeros(32, 32, 32)
    mask[16, 16, 16] = mask[16, 16, 16 + 9] = mask[16 - 2, 16 + 3, 16] = 1.0
    assert support_radius_px(mask) == 9.0
