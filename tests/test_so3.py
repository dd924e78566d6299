import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryosgd.conventions import euler_to_matrix
from cryosgd.pose.so3 import (angular_step_deg, cube_offsets, exp_map, geodesic_distance_deg, healpix_directions,
                              local_rotations, log_map, random_rotations, uniform_rotations)


def _unit_vectors(theta, phi):
    return torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], -1)


def _angles_between_deg(a, b):
    """``(N, M)`` angles between unit vectors ``a (N, 3)`` and ``b (M, 3)``."""
    return torch.rad2deg(torch.arccos((a @ b.T).clamp(-1, 1)))


def _nearest_grid_distance_deg(rotations, grid, chunk=500):
    """Geodesic distance of each rotation to its nearest grid rotation, via tr(AᵀB) = 1 + 2 cos θ."""
    flat = grid.reshape(-1, 9)
    best = torch.cat([(rotations[i:i + chunk].reshape(-1, 9) @ flat.T).amax(-1)
                      for i in range(0, len(rotations), chunk)])
    return torch.rad2deg(torch.arccos(((best - 1) / 2).clamp(-1, 1)))


@pytest.mark.parametrize("order", range(7))
def test_healpix_centres_match_the_bsd_healpix_package(order):
    healpix = pytest.importorskip("healpix")
    theta, phi = healpix_directions(order)
    theta_ref, phi_ref = healpix.pix2ang(2**order, np.arange(12 * 4**order), nest=True)
    np.testing.assert_allclose(theta.numpy(), theta_ref, rtol=0, atol=1e-13)
    wrapped = np.angle(np.exp(1j * (phi.numpy() - phi_ref)))  # the package returns φ in [−π, π)
    np.testing.assert_allclose(wrapped, 0, atol=1e-13)
    assert phi.min() >= 0 and phi.max() < 2 * math.pi


@pytest.mark.parametrize("order", [0, 1, 3])
def test_healpix_rings_enclose_the_area_of_their_pixel_count(order):
    """Equal area: the cap above each ring centre holds 4π(1 − z)/2 of the sphere, i.e.
    #(pixels above) + ½ #(pixels on the ring) = Np (1 − z)/2 exactly; ring sizes 4i / 4N / 4(4N − i)."""
    nside = 2**order
    theta, phi = healpix_directions(order)
    z = theta.cos()
    n_pix = z.numel()
    assert n_pix == 12 * nside**2
    rings = torch.unique(torch.round(z, decimals=12)).flip(0)  # north to south
    assert len(rings) == 4 * nside - 1
    for i, z_ring in enumerate(rings, start=1):
        on_ring = (z - z_ring).abs() < 1e-9
        above = z > z_ring + 1e-9
        assert above.sum() + 0.5 * on_ring.sum() == pytest.approx(n_pix * (1 - z_ring.item()) / 2, abs=1e-9)
        assert on_ring.sum() == 4 * min(i, nside, 4 * nside - i)
        spacing = torch.diff(torch.sort(phi[on_ring]).values)
        torch.testing.assert_close(spacing, torch.full_like(spacing, 2 * math.pi / on_ring.sum().item()))


def test_nested_numbering_runs_south_east_west_north_within_a_face():
    """Górski et al. (2005) fig. 4: the four order-1 pixels of a face are numbered from its
    southern corner, then east, west, north."""
    theta, phi = healpix_directions(1)
    z = theta.cos()
    for face in range(12):
        south, east, west, north = range(4 * face, 4 * face + 4)
        assert z[south] < z[east] == z[west] < z[north]
        assert 0 < (phi[east] - phi[west]) % (2 * math.pi) < math.pi


def test_healpix_centres_are_distinct_and_nearly_uniformly_spaced():
    directions = _unit_vectors(*healpix_directions(3))
    distance = _angles_between_deg(directions, directions).fill_diagonal_(360.0)
    nearest = distance.min(-1).values
    assert nearest.min() > 0.5 * math.degrees(math.sqrt(4 * math.pi / len(directions)))
    assert nearest.max() / nearest.min() < 1.6  # measured 1.26 at order 3


@pytest.mark.parametrize("order", [1, 3])
def test_nested_children_of_p_are_4p_to_4p_plus_3_and_nearest_to_p(order):
    parents = _unit_vectors(*healpix_directions(order))
    children = _unit_vectors(*healpix_directions(order + 1))
    nearest_parent = _angles_between_deg(children, parents).argmin(-1)
    assert torch.equal(nearest_parent, torch.arange(len(children)) // 4)
    to_parent = torch.rad2deg(torch.arccos((children * parents.repeat_interleave(4, 0)).sum(-1).clamp(-1, 1)))
    pixel_size_deg = math.degrees(math.sqrt(4 * math.pi / len(parents)))
    assert to_parent.max() < 0.6 * pixel_size_deg  # measured 0.42–0.52 for orders 0–5


def test_uniform_rotations_have_relion_counts_angles_and_zero_mean():
    for order, count in [(1, 576), (2, 4608)]:
        grid = uniform_rotations(order)
        assert len(grid) == count == grid.angles_deg.shape[0]
        assert grid.step_deg == angular_step_deg(order) == 60 / 2**order
        psi = torch.unique(grid.angles_deg[:, 2])
        torch.testing.assert_close(psi, torch.arange(6 * 2**order, dtype=torch.float64) * grid.step_deg)
        torch.testing.assert_close(grid.matrices, euler_to_matrix(grid.angles_deg))
        assert grid.matrices.mean(0).abs().max() < 1e-12  # uniform first moment
    assert len(uniform_rotations(3)) == 36864


def test_covering_radius_is_below_step_and_halves_per_order():
    """Measured with these 2,000 rotations (seed 0): max 25.3°, 13.0°, 5.9°; median 14.7°,
    7.4°, 3.7°; mean 14.2°, 7.15°, 3.55° for orders 1, 2, 3 (steps 30°, 15°, 7.5°)."""
    samples = random_rotations(2000, torch.Generator().manual_seed(0))
    means = []
    for order in (1, 2, 3):
        step = angular_step_deg(order)
        distance = _nearest_grid_distance_deg(samples, uniform_rotations(order).matrices)
        assert distance.max() < 0.95 * step
        assert 0.4 * step < distance.median() < 0.6 * step
        means.append(distance.mean().item())
    assert 1.8 < means[0] / means[1] < 2.2 and 1.8 < means[1] / means[2] < 2.2


def _rotvecs_with_angles(angles_rad, seed=0):
    axes = torch.randn(len(angles_rad), 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return axes / torch.linalg.norm(axes, dim=-1, keepdim=True) * torch.as_tensor(angles_rad)[:, None]


EDGE_ANGLES = torch.tensor([0.0, 1e-12, 1e-8, 1e-4, 0.3, 1.5, math.pi / 2, 1.6, 3.0, math.pi - 1e-4, math.pi - 1e-8],
                           dtype=torch.float64)


def test_exp_map_matches_scipy_rodrigues():
    angles = torch.cat([EDGE_ANGLES, torch.rand(50, dtype=torch.float64) * 2 * math.pi])
    v = _rotvecs_with_angles(angles)
    np.testing.assert_allclose(exp_map(v).numpy(), Rotation.from_rotvec(v.numpy()).as_matrix(), atol=1e-14)


def test_log_map_inverts_exp_map_near_zero_and_near_pi():
    angles = torch.cat([EDGE_ANGLES, torch.rand(50, dtype=torch.float64) * math.pi])
    v = _rotvecs_with_angles(angles, seed=1)
    back = log_map(exp_map(v))
    assert (back - v).abs().max() < 1e-8  # near π the axis comes from R + Rᵀ, good to ~√ε·(π − θ)
    assert (back[:-2] - v[:-2]).abs().max() < 1e-12
    np.testing.assert_allclose(back.numpy(), Rotation.from_matrix(exp_map(v).numpy()).as_rotvec(), atol=1e-8)


def test_log_map_at_exactly_pi_returns_a_valid_half_turn():
    half_turns = exp_map(_rotvecs_with_angles([math.pi] * 5, seed=2))
    v = log_map(half_turns)
    torch.testing.assert_close(torch.linalg.norm(v, dim=-1), torch.full((5,), math.pi, dtype=torch.float64))
    torch.testing.assert_close(exp_map(v), half_turns, atol=1e-14, rtol=0)


def test_geodesic_distance_is_the_perturbation_angle_and_broadcasts():
    g = torch.Generator().manual_seed(3)
    base = random_rotations(6, g)
    angles = torch.tensor([1e-9, 1e-5, 0.2, 1.0, 2.5, math.pi - 1e-6], dtype=torch.float64)
    moved = base @ exp_map(_rotvecs_with_angles(angles, seed=4))
    torch.testing.assert_close(geodesic_distance_deg(base, moved), torch.rad2deg(angles),
                               atol=1e-10, rtol=1e-8)
    table = geodesic_distance_deg(base[:, None], moved[None])
    assert table.shape == (6, 6)
    torch.testing.assert_close(table, geodesic_distance_deg(moved[None], base[:, None]))


def test_local_rotations_sit_at_offset_times_step_from_the_centre():
    centres = random_rotations(4, torch.Generator().manual_seed(5))
    step = 2.5
    for points in (1, 2):
        local = local_rotations(centres, step, points)
        side = 2 * points + 1
        assert local.shape == (4, side**3, 3, 3)
        expected = torch.linalg.norm(cube_offsets(points), dim=-1) * step
        torch.testing.assert_close(geodesic_distance_deg(centres[:, None], local), expected.expand(4, -1),
                                   atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(local[:, side**3 // 2], centres)


def test_local_perturbation_acts_in_the_map_frame():
    """Right multiplication: c = (0, 0, ±1) moves RELION's rot by ∓step and keeps tilt and psi."""
    angles = torch.tensor([[40.0, 70.0, -20.0]], dtype=torch.float64)
    local = local_rotations(euler_to_matrix(angles), 3.0)[0]
    offsets = cube_offsets(1)
    for sign in (1, -1):
        index = int(torch.nonzero((offsets == torch.tensor([0.0, 0.0, sign])).all(-1)))
        expected = euler_to_matrix(angles + torch.tensor([-3.0 * sign, 0.0, 0.0], dtype=torch.float64))
        torch.testing.assert_close(local[index], expected[0])


def test_random_rotations_are_haar_uniform():
    rotations = random_rotations(4000, torch.Generator().manual_seed(6))
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), eye.expand(4000, 3, 3))
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(4000, dtype=torch.float64))
    assert rotations.mean(0).abs().max() < 4 / math.sqrt(4000)
    angle = torch.deg2rad(geodesic_distance_deg(eye, rotations))
    for q in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):  # Haar: P(angle ≤ q) = (q − sin q)/π
        assert abs((angle <= q).double().mean() - (q - math.sin(q)) / math.pi) < 0.03
