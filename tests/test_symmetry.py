import math
import os
import re
import shutil
import subprocess

import pytest
import torch

from cryosgd.conventions import map_to_ft
from cryosgd.errors import InputError
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import extract
from cryosgd.pose.so3 import angular_step_deg, exp_map, healpix_directions, log_map, random_rotations
from cryosgd.pose.symmetry import (asymmetric_unit, equivalent_poses, nearest_mate, symmetry_grid,
                                   symmetry_group)

ORDERS = {"C1": 1, "C2": 2, "C4": 4, "C7": 7, "D1": 2, "D2": 4, "D3": 6, "D5": 10, "T": 12, "O": 24,
          "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60}
RELION_NAMES = ["C1", "C4", "D3", "T", "O", "I", "I1", "I2", "I3", "I4"]


def _max_set_distance(a, b):
    """Largest distance from a matrix of ``a`` to its nearest matrix of ``b`` (max-abs entry)."""
    return (a[:, None] - b[None]).abs().amax((-1, -2)).min(1).values.max().item()


@pytest.fixture
def relion_refine():
    """Path of relion_refine; skip when absent unless CRYOSGD_REQUIRE_RELION is set."""
    exe = shutil.which("relion_refine")
    if exe is None:
        if os.environ.get("CRYOSGD_REQUIRE_RELION"):
            pytest.fail("CRYOSGD_REQUIRE_RELION is set but relion_refine is not on PATH")
        pytest.skip("relion_refine not installed")
    return exe


def _relion_symmetry_ops(exe, name):
    """``(G, 3, 3)`` R matrices printed by ``relion_refine --sym name --print_symmetry_ops``."""
    out = subprocess.run([exe, "--sym", name, "--print_symmetry_ops"], capture_output=True, text=True,
                         timeout=60).stdout
    number = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
    blocks = re.split(r"\bR\(\d+\)=", out)[1:]
    mats = [[float(x) for x in re.findall(number, block)[:9]] for block in blocks]
    return torch.tensor(mats, dtype=torch.float64).reshape(-1, 3, 3)


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_group_has_its_order_and_is_closed(name):
    group = symmetry_group(name)
    assert group.shape == (ORDERS[name], 3, 3)
    torch.testing.assert_close(group[0], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(group @ group.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(group))
    torch.testing.assert_close(torch.linalg.det(group), torch.ones(len(group), dtype=torch.float64))
    products = (group[:, None] @ group[None]).reshape(-1, 3, 3)
    assert _max_set_distance(products, group) < 1e-12
    assert _max_set_distance(group.transpose(-1, -2), group) < 1e-12
    assert (group[:, None] - group[None]).abs().amax((-1, -2)).fill_diagonal_(1.0).min() > 1e-3


# POSES.md §3.5: (group, fold, axis) as printed there, 6 digits
TABLE_GENERATORS = [
    ("C4", 4, (0, 0, 1)), ("D3", 3, (0, 0, 1)), ("D3", 2, (1, 0, 0)),
    ("T", 3, (0, 0, 1)), ("T", 2, (0, 0.816496, 0.577350)),
    ("O", 3, (1, 1, 1)), ("O", 4, (0, 0, 1)),
    ("I2", 2, (0, 0, 1)), ("I2", 5, (0.525731, 0, 0.850651)), ("I2", 3, (0, 0.356822, 0.934172)),
    ("I1", 2, (1, 0, 0)), ("I1", 5, (0.850651, 0, -0.525731)), ("I1", 3, (0.934172, 0.356822, 0)),
    ("I3", 2, (-0.525731, 0, 0.850651)), ("I3", 5, (0, 0, 1)), ("I3", 3, (-0.491123, 0.356822, 0.794654)),
    ("I4", 2, (0.525731, 0, 0.850651)), ("I4", 5, (0.894427, 0, 0.447214)), ("I4", 3, (0.491123, 0.356822, 0.794654)),
]


@pytest.mark.parametrize("name, fold, axis", TABLE_GENERATORS)
def test_group_holds_relion_generator_about_the_tabulated_axis(name, fold, axis):
    u = torch.tensor(axis, dtype=torch.float64)
    expected = u / torch.linalg.norm(u) * (2 * math.pi / fold)
    rotvecs = log_map(symmetry_group(name))
    error = torch.minimum((rotvecs - expected).norm(dim=-1), (rotvecs + expected).norm(dim=-1)).min()
    assert error < 1e-5


def test_names_are_case_insensitive_and_bad_names_raise_input_error():
    torch.testing.assert_close(symmetry_group("d3"), symmetry_group("D3"))
    torch.testing.assert_close(symmetry_group(" i "), symmetry_group("I2"))
    for bad in ["", "X", "C0", "D", "I5", "C-2", "Oh"]:
        with pytest.raises(InputError, match=r"expected C1, Cn, Dn, T, O or I \(I1–I4\)"):
            symmetry_group(bad)


@pytest.mark.relion
def test_groups_equal_relion_print_symmetry_ops(relion_refine):
    for name in RELION_NAMES:
        relion = _relion_symmetry_ops(relion_refine, name)
        ours = symmetry_group(name)
        assert relion.shape == ours.shape, name
        assert _max_set_distance(relion, ours) < 1e-4, name
        assert _max_set_distance(ours, relion) < 1e-4, name


def _extract_errors(volume_ft, group, rotations, freq_px):
    """Relative slice differences of the mates R @ L and of the image-frame rotations L @ R,
    worst over the group and the rotations; one extract call."""
    mates = equivalent_poses(rotations, group)                       # (B, G, 3, 3) = R @ L
    image_frame = group[None] @ rotations[:, None]                   # (B, G, 3, 3) = L @ R
    stacked = torch.cat([rotations, mates.reshape(-1, 3, 3), image_frame.reshape(-1, 3, 3)])
    slices = extract(volume_ft, stacked, freq_px)
    base, rest = slices[:len(rotations)], slices[len(rotations):].reshape(2, len(rotations), len(group), -1)
    relative = torch.linalg.norm(rest - base[None, :, None], dim=-1) / torch.linalg.norm(base, dim=-1)[None, :, None]
    return relative[0].max().item(), relative[1].max().item()


def _symmetrise_by_index_permutation(volume, group):
    """Exact ``mean_L v(L x)`` of a ``[z, y, x]`` map for signed-permutation groups; x = (x, y, z)
    from the box centre, periodic."""
    n = volume.shape[0]
    c = torch.arange(n) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    xyz = torch.stack([x, y, z], -1)
    out = torch.zeros_like(volume)
    for g in group.round().long():
        sx, sy, sz = (xyz @ g.T + n // 2).remainder(n).unbind(-1)
        out += volume[sz, sy, sx]
    return out / len(group)


@pytest.mark.parametrize("name", ["C4", "D4", "O"])
def test_mates_r_at_l_give_identical_slices_of_a_symmetric_map(name):
    """Exact: a random [z, y, x] map averaged over a group of signed permutations of (x, y, z)
    has a grid transform invariant under the group, and trilinear slices commute with it."""
    group = symmetry_group(name)
    assert (group - group.round()).abs().max() < 1e-12
    g = torch.Generator().manual_seed(0)
    box = 64
    volume = _symmetrise_by_index_permutation(torch.randn(box, box, box, generator=g, dtype=torch.float64), group)
    grid = FourierGrid.create(box, 1.0)
    same, image_frame = _extract_errors(map_to_ft(volume), group.round(), random_rotations(3, g), grid.freq_px)
    assert same < 1e-12
    assert image_frame > 0.5


def _analytic_symmetric_ft(box, group, centres_px, weights, radius_px):
    """Half-grid transform of point masses at the orbits ``{L c}`` (map frame, from the box centre),
    evaluated exactly at ``|q| ≤ radius_px + 2``, zero beyond."""
    k = torch.fft.fftfreq(box, 1 / box, dtype=torch.float64)
    qz, qy, qx = torch.meshgrid(k, k, torch.arange(box // 2 + 1, dtype=torch.float64), indexing="ij")
    q = torch.stack([qx, qy, qz], -1)
    inside = (q**2).sum(-1) <= (radius_px + 2) ** 2
    positions = torch.einsum("gij,cj->gci", group, centres_px).reshape(-1, 3)
    phase = -2 * math.pi * q[inside] @ positions.T / box
    volume_ft = torch.zeros(q.shape[:-1], dtype=torch.complex128)
    volume_ft[inside] = torch.polar(weights.repeat(len(group)).expand_as(phase), phase).sum(-1)
    return volume_ft


@pytest.mark.parametrize("name", ["D3", "T", "I", "I3"])
def test_mates_r_at_l_give_the_same_slices_for_any_group(name):
    """Trilinear on the exact transform of a symmetric map: the mates agree to the interpolation
    error (measured 2.4–2.5e-3 at box 64, atoms 2.5 px from the centre, band 30 px), image-frame
    rotations L @ R do not (measured 0.26–0.93)."""
    group = symmetry_group(name)
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 3, generator=g, dtype=torch.float64)
    centres = 2.5 * centres / torch.linalg.norm(centres, dim=-1, keepdim=True)
    weights = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    grid = FourierGrid.create(64, 1.0, radius_px=30)
    volume_ft = _analytic_symmetric_ft(64, group, centres, weights, grid.radius_px)
    same, image_frame = _extract_errors(volume_ft, group, random_rotations(3, g), grid.freq_px)
    assert same < 5e-3
    assert image_frame > 0.1


def _directions(order):
    theta, phi = healpix_directions(order)
    return torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()], -1)


@pytest.mark.parametrize("name", ["C4", "D3", "T", "O", "I", "I3"])
def test_asymmetric_unit_holds_one_over_g_of_the_directions(name):
    group = symmetry_group(name)
    directions = _directions(5)
    kept = asymmetric_unit(directions, group).sum().item()
    assert kept == pytest.approx(len(directions) / len(group), rel=0.02)  # worst measured: I3, 1.4 %


@pytest.mark.parametrize("name", ["C4", "D3", "O", "I"])
def test_symmetry_grid_mates_cover_so3_like_the_full_grid(name):
    """Every direction of the full order-3 grid is within a step of a mate of a kept direction,
    and every random rotation within the C1 covering bound (0.95 step) of a mate R @ L of the
    order-2 symmetry grid."""
    group = symmetry_group(name)
    full = _directions(3)
    mates = torch.einsum("gij,nj->gni", group, full[asymmetric_unit(full, group)]).reshape(-1, 3)
    angle_deg = torch.rad2deg(torch.arccos((full @ mates.T).clamp(-1, 1))).min(-1).values
    assert angle_deg.max() < angular_step_deg(3)

    grid = symmetry_grid(2, group)
    assert len(grid) == pytest.approx(4608 / len(group), rel=0.05 if len(group) < 60 else 0.1)
    candidates = equivalent_poses(grid.matrices, group).reshape(-1, 9)
    samples = random_rotations(300, torch.Generator().manual_seed(2)).reshape(-1, 9)
    cos = ((samples @ candidates.T).amax(-1) - 1) / 2
    assert torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).max() < 0.95 * angular_step_deg(2)


def test_nearest_mate_picks_the_closest_equivalent_pose():
    group = symmetry_group("D3")
    g = torch.Generator().manual_seed(3)
    rotations = random_rotations(20, g)
    which = torch.randint(len(group), (20,), generator=g)
    nudged = rotations @ group[which] @ exp_map(0.05 * torch.randn(20, 3, generator=g, dtype=torch.float64))
    torch.testing.assert_close(nearest_mate(rotations, nudged, group), rotations @ group[which])

    reference = random_rotations(20, g)
    best = nearest_mate(rotations, reference, group)
    distances = torch.stack([torch.rad2deg(log_map(reference.transpose(-1, -2) @ rotations @ L).norm(dim=-1))
                             for L in group], -1)
    torch.testing.assert_close(torch.rad2deg(log_map(reference.transpose(-1, -2) @ best).norm(dim=-1)),
                               distances.min(-1).values)
