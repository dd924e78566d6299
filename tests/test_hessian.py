"""The conditioning analysis: κ(R) against an independent count, Lanczos against dense eigenvalues."""

import subprocess

import numpy as np
import pytest
import torch

from cryosgd.analysis.hessian import RestrictedHessian, full_grid, hermitian
from cryosgd.data.batch import make_batch
from cryosgd.data.particles import read_particles, write_particles
from cryosgd.fourier.grids import FourierGrid
from cryosgd.io.mrc import read_map, write_map
from cryosgd.model.forward import ForwardModel
from cryosgd.sim.phantom import blob_phantom
from cryosgd.objective.diagonal import exact_diagonal
from cryosgd.fourier.grids import voxel_multiplicity
from cryosgd.objective.loss import LeastSquares

from conftest import random_particles, relion_ctf, run_cli


def _relion_matrix(rot, tilt, psi):
    """RELION's A = R_z(psi) R_y(tilt) R_z(rot), written out (RELION-CONVENTIONS.md)."""
    a, b, g = np.radians(rot), np.radians(tilt), np.radians(psi)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.array([[cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
                     [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
                     [sb * ca, sb * sa, cb]])


def _independent_kappa(table, box, use_ctf, l2=1e-8):
    """NN hit counts (CTF²-weighted) on the full cube from the full disc, then max/min per ball."""
    radius = box // 2 - 1
    k = np.arange(-box // 2, box // 2)
    kx, ky = (a.ravel() for a in np.meshgrid(k, k, indexing="xy"))
    disc = kx**2 + ky**2 <= radius**2
    kx, ky = kx[disc], ky[disc]
    counts = np.zeros((box, box, box))
    for i in range(len(table)):
        q = _relion_matrix(*table.angles_deg[i]).T @ np.stack([kx, ky, np.zeros_like(kx)]).astype(float)
        v = np.floor(q + 0.5).astype(int) % box
        weight = relion_ctf(table, i, kx / (box * table.pixel_A), ky / (box * table.pixel_A))**2 if use_ctf else 1.0
        np.add.at(counts, (v[2], v[1], v[0]), weight)
    h = counts / len(table) + l2
    f = np.fft.fftfreq(box, 1 / box)
    r = np.sqrt(f[:, None, None]**2 + f[None, :, None]**2 + f[None, None, :]**2)
    return np.array([h[r < R - 0.5].max() / h[r < R - 0.5].min() for R in range(1, box // 2)])


@pytest.mark.parametrize("use_ctf", [False, True])
def test_nearest_kappa_on_relion_star_matches_independent_count(tmp_path, relion, use_ctf):
    box, pixel_A, n = 24, 3.0, 1500
    write_map(tmp_path / "map.mrc", blob_phantom(box, seed=2), pixel_A)
    write_particles(tmp_path / "in.star", random_particles(n, box, pixel_A, seed=4))
    subprocess.run(["relion_project", "--i", "map.mrc", "--ang", "in.star", "--o", "relion", "--ctf"],
                   cwd=tmp_path, check=True, capture_output=True)
    table = read_particles(tmp_path / "relion.star")
    args = ["hessian", str(tmp_path / "relion.star"), "-o", str(tmp_path / "h"), "--interp", "nearest"]
    code, out = run_cli(*args, *([] if use_ctf else ["--no-ctf"]))
    assert code == 0, out
    rows = np.genfromtxt(tmp_path / "h" / "kappa.csv", delimiter=",", names=True)
    expected = _independent_kappa(table, box, use_ctf)
    np.testing.assert_allclose(rows["kappa_diagonal"], expected, rtol=0.02)
    # above the paper's nearest-neighbour bound at every radius ≥ 2; with the CTF, mostly because
    # the CTF suppresses the low frequencies (H₀₀ = Q0² = 0.01 below), so κ there is several times
    # the bound and larger than without the CTF
    assert np.all(rows["kappa_diagonal"][1:] > rows["bound"][1:])
    if use_ctf:
        assert np.all(rows["kappa_diagonal"][1:4] > 2 * rows["bound"][1:4])
    diagonal, _ = read_map(tmp_path / "h" / "hessian_diagonal.mrc")
    origin = diagonal[box // 2, box // 2, box // 2]
    assert origin == pytest.approx(1.0 if not use_ctf else 0.1**2, rel=1e-4)  # H₀₀ = 1 (+λ), or mean Q0²


def test_lanczos_matches_dense_eigenvalues_on_a_tiny_box():
    torch.manual_seed(0)
    box, radii = 8, torch.tensor([2.0, 3.5])
    grid = FourierGrid.create(box, 2.0)
    objective = LeastSquares(ForwardModel(grid, "trilinear"), ridge=1e-3)
    batch = make_batch(random_particles(40, box, 2.0, seed=1), np.arange(40), dtype=torch.float64)
    shape = grid.volume_shape
    diagonal = exact_diagonal(objective, batch, torch.float64)
    for scale in (voxel_multiplicity(shape, dtype=torch.float64).rsqrt(), diagonal.rsqrt()):
        operator = RestrictedHessian(lambda z: objective.hvp(z, batch), radii, scale)
        for i in range(len(radii)):
            basis = _subspace_basis(operator, i, shape)
            images = torch.stack([operator(_expand(v, i, len(radii)))[i] for v in basis])
            dense = torch.stack([torch.stack([(u.conj() * w).real.sum() for w in images]) for u in basis])
            np.testing.assert_allclose(dense, dense.T, atol=1e-10)
            eigenvalues = torch.linalg.eigvalsh(dense)
            estimate = operator.extremes(iterations=len(basis))
            assert float(estimate.smallest[i]) == pytest.approx(float(eigenvalues[0]), rel=1e-6)
            assert float(estimate.largest[i]) == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
            few = operator.extremes(iterations=25)  # Ritz values lie inside the spectrum
            assert float(eigenvalues[0]) - 1e-12 <= float(few.smallest[i]) <= float(few.largest[i]) \
                <= float(eigenvalues[-1]) + 1e-12
            assert float(few.largest[i]) == pytest.approx(float(eigenvalues[-1]), rel=1e-3)


def _expand(v, i, k):
    out = torch.zeros(k, *v.shape, dtype=v.dtype)
    out[i] = v
    return out


def _subspace_basis(operator, i, shape):
    """An orthonormal basis (real inner product) of the ball's real-map subspace, from unit vectors."""
    vectors = []
    for flat in range(int(np.prod(shape))):
        for unit in (1.0, 1.0j):
            e = torch.zeros(int(np.prod(shape)), dtype=torch.complex128)
            e[flat] = unit
            vectors.append(operator.restrict(_expand(e.reshape(shape), i, len(operator.balls)))[i])
    real = torch.stack([torch.view_as_real(v).flatten() for v in vectors])
    u, s, vh = torch.linalg.svd(real, full_matrices=False)
    rank = int((s > 1e-8 * s[0]).sum())
    return [torch.view_as_complex(b.reshape(*shape, 2).contiguous()) for b in vh[:rank]]


def test_full_grid_diagonal_is_symmetric_and_sums_like_the_half_grid():
    torch.manual_seed(3)
    n = 8
    half = torch.rand(n, n, n // 2 + 1, dtype=torch.float64)
    full = full_grid(half)
    mirrored = torch.roll(torch.flip(full, (0, 1, 2)), (1, 1, 1), (0, 1, 2))
    torch.testing.assert_close(full, mirrored)
    assert float(full.sum()) == pytest.approx(float(half.sum()))
    x = torch.randn(n, n, n // 2 + 1, dtype=torch.complex128)
    torch.testing.assert_close(hermitian(hermitian(x)), hermitian(x))
