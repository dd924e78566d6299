import dataclasses

import numpy as np
import pytest
import torch

from cryosgd.conventions import euler_to_matrix
from cryosgd.data.batch import Batch, CTFParams
from cryosgd.fourier.grids import FourierGrid
from cryosgd.model.forward import ForwardModel
from cryosgd.objective.diagonal import exact_diagonal, hutchinson_probe, rademacher
from cryosgd.objective.loss import LeastSquares
from cryosgd.pose.search import Candidates, weighted_rows


def _problem(interp, n_images=40, box=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = FourierGrid.create(box, 2.0)
    angles = torch.rand(n_images, 3, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    ones = torch.ones(n_images, dtype=torch.float64)
    defocus = 5000 + 20000 * torch.rand(n_images, generator=g, dtype=torch.float64)
    ctf = CTFParams(defocus, defocus - 500, ones * 20, ones * 300, ones * 2.7, ones * 0.1, ones * 0, ones * 0, ones)
    images = torch.randn(n_images, len(grid.freq_px), generator=g, dtype=torch.complex128)
    batch = Batch(np.arange(n_images), euler_to_matrix(angles), torch.randn(n_images, 2, generator=g,
                  dtype=torch.float64), ctf, images)
    objective = LeastSquares(ForwardModel(grid, interp), ridge=1e-3)
    x = torch.randn(grid.volume_shape, generator=g, dtype=torch.complex128)
    return objective, batch, x, g


@pytest.mark.parametrize("interp", ["trilinear", "nearest"])
def test_gradient_equals_autograd_of_loss(interp):
    objective, batch, x, _ = _problem(interp)
    x_ = x.clone().requires_grad_()
    objective.loss(x_, batch).backward()
    loss, gradient = objective.loss_and_gradient(x, batch)
    torch.testing.assert_close(gradient, x_.grad)


def test_loss_matches_full_plane_sum_of_squares():
    objective, batch, x, _ = _problem("trilinear")
    r = objective.residual(x, batch)
    kx = objective.model.grid.freq_px[:, 0]
    full = (r.abs() ** 2).sum(1) + (r[:, kx > 0].abs() ** 2).sum(1)
    ridge = (x.abs() ** 2).sum() + (x[..., 1:-1].abs() ** 2).sum()  # kx = 0 and Nyquist planes once
    expected = 0.5 * full.mean() + 0.5 * 1e-3 * ridge
    torch.testing.assert_close(objective.loss(x, batch), expected)


def test_hvp_is_finite_difference_of_gradient():
    objective, batch, x, g = _problem("trilinear")
    z = torch.randn(x.shape, generator=g, dtype=torch.complex128)
    _, g1 = objective.loss_and_gradient(x + 1e-3 * z, batch)
    _, g0 = objective.loss_and_gradient(x, batch)
    torch.testing.assert_close(objective.hvp(z, batch), (g1 - g0) / 1e-3)


def test_nearest_neighbour_hessian_is_its_exact_diagonal():
    objective, batch, x, g = _problem("nearest")
    diag = exact_diagonal(objective, batch, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.complex128)
    torch.testing.assert_close(objective.hvp(z, batch), diag * z)


def test_trilinear_exact_diagonal_matches_unit_vector_hvps():
    objective, batch, x, _ = _problem("trilinear", n_images=10, box=12)
    diag = exact_diagonal(objective, batch, dtype=torch.float64)
    for index in [(0, 0, 0), (1, 2, 3), (11, 4, 2), (5, 9, 6)]:
        e = torch.zeros(x.shape, dtype=torch.complex128)
        e[index] = 1.0
        assert float(objective.hvp(e, batch)[index].real) == pytest.approx(float(diag[index]), rel=1e-10)


def test_hutchinson_error_falls_like_one_over_sqrt_probes():
    objective, batch, x, g = _problem("trilinear", n_images=20, box=12)
    exact = exact_diagonal(objective, batch, dtype=torch.float64)
    total, errors = torch.zeros_like(exact), {}
    for k in range(1, 257):
        total += hutchinson_probe(objective, batch, rademacher(x.shape, g, torch.complex128))
        if k in (16, 256):
            errors[k] = float((total / k - exact).norm() / exact.norm())
    assert errors[256] < errors[16]
    assert errors[16] / errors[256] == pytest.approx(4.0, rel=0.3)  # √(256/16)


def test_data_terms_are_the_quadratic_at_zero_with_per_group_noise_weights():
    objective, batch, x, g = _problem("trilinear")
    grid = objective.model.grid
    batch = dataclasses.replace(batch, optics_group=torch.arange(len(batch)) % 2)
    noise_weight = 0.5 + torch.rand(2, len(grid.freq_px), generator=g, dtype=torch.float64)
    objective = dataclasses.replace(objective, ridge=0.0, noise_weight=noise_weight)
    r = objective.residual(x, batch)
    weight = grid.multiplicity * noise_weight[batch.optics_group]
    torch.testing.assert_close(objective.loss(x, batch), 0.5 * (weight * r.abs() ** 2).sum() / len(batch))
    terms = objective.data_terms(batch)
    loss0, gradient0 = objective.loss_and_gradient(torch.zeros_like(x), batch)
    torch.testing.assert_close(terms.c / len(batch), loss0)
    torch.testing.assert_close(terms.b / len(batch), -gradient0)
    torch.testing.assert_close(terms.diagonal / len(batch), exact_diagonal(objective, batch, dtype=torch.float64))
    torch.testing.assert_close((terms.density / len(batch)).to(x.dtype), objective.hvp(torch.ones_like(x), batch))  # H·1


def test_row_weights_scale_each_image_and_the_count():
    """Rows with weights ρ (soft poses) count ρ times: the loss of rows (ρ₁, ρ₂) is that of
    the images repeated in those proportions, divided by Σρ."""
    objective, batch, x, g = _problem("trilinear", n_images=6)
    weight = torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5, 1.0], dtype=torch.float64)
    weighted = dataclasses.replace(batch, weight=weight)
    r = objective.residual(x, batch)
    per_image = 0.5 * (objective.model.grid.multiplicity * r.abs() ** 2).sum(1)
    expected = (weight * per_image).sum() / weight.sum() + objective.ridge_loss(x)
    torch.testing.assert_close(objective.loss(x, weighted), expected)


def test_weighted_rows_share_each_image_at_an_origin_and_give_the_data_terms_of_their_rows():
    """Rows of one image at one origin share one image of ``rows.images``; their data terms
    (made per image, scattered per row with its weight) equal those of the rows as a batch of
    repeated images (each scattered with its own modulated values), by the loss's derivatives."""
    objective, batch, x, g = _problem("trilinear", n_images=5)
    grid = objective.model.grid
    batch = dataclasses.replace(batch, optics_group=torch.arange(len(batch)) % 2)
    objective = dataclasses.replace(objective, ridge=0.0, noise_weight=0.5 + torch.rand(
        2, len(grid.freq_px), generator=g, dtype=torch.float64))
    k = 4
    rotations = euler_to_matrix(torch.rand(5, k, 3, generator=g, dtype=torch.float64) * 180)
    shift_A = torch.randn(5, 1, 2, generator=g, dtype=torch.float64).expand(5, k, 2).clone()
    shift_A[0, 3] += 1.0  # one pose at another origin
    weight = torch.rand(5, k, generator=g, dtype=torch.float64)
    weight[2, 1] = 0.0  # a pose without weight makes no row
    group = torch.stack([torch.eye(3, dtype=torch.float64), torch.diag(torch.tensor([-1.0, -1.0, 1.0],
                                                                                    dtype=torch.float64))])
    rows = weighted_rows(batch, Candidates(rotations, shift_A, torch.zeros(5, k)), weight, group)
    assert len(rows.images) == 6 and len(rows) == 2 * (5 * k - 1)
    flat = rows.batch()
    live = weight.reshape(-1) > 0
    torch.testing.assert_close(flat.shift_A, shift_A.reshape(-1, 2)[live].repeat_interleave(2, 0))
    torch.testing.assert_close(flat.weight, (weight.reshape(-1)[live] / 2).repeat_interleave(2))
    torch.testing.assert_close(flat.rotations, (rotations.reshape(-1, 3, 3)[live][:, None] @ group).reshape(-1, 3, 3))
    torch.testing.assert_close(flat.images_ft, batch.images_ft.repeat_interleave(k, 0)[live].repeat_interleave(2, 0))
    terms = objective.data_terms(rows)
    total = float(flat.weight.sum())
    loss0, gradient0 = objective.loss_and_gradient(torch.zeros_like(x), flat)
    torch.testing.assert_close(terms.c / total, loss0)
    torch.testing.assert_close(terms.b / total, -gradient0)
    torch.testing.assert_close(terms.diagonal / total, exact_diagonal(objective, flat, dtype=torch.float64))
    torch.testing.assert_close((terms.density / total).to(x.dtype), objective.hvp(torch.ones_like(x), flat))


def test_an_empty_share_makes_no_rows_and_zero_data_terms():
    """A process's empty share of a batch is one image of weight 0: no rows, zero sums (each
    rank must return sums of the same shapes), by the em pass and by a minibatch step."""
    objective, batch, x, g = _problem("trilinear", n_images=1)
    batch = dataclasses.replace(batch, weight=torch.zeros(1, dtype=torch.float64))
    rows = weighted_rows(batch, Candidates(batch.rotations[:, None], batch.shift_A[:, None], torch.zeros(1, 1)),
                         torch.ones(1, 1, dtype=torch.float64), torch.eye(3, dtype=torch.float64)[None])
    assert len(rows) == 0
    terms = objective.data_terms(rows)
    assert float(terms.c) == 0 and not bool(terms.b.any()) and not bool(terms.density.any())
    sums = objective.data_gradients(x, rows.batch(), diagonal=2)
    assert float(sums.loss) == 0 and not bool(sums.gradient.any()) and not bool(sums.diagonal.any())
