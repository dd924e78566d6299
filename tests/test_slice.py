import numpy as np
import pytest
import torch

from cryosgd.conventions import euler_to_matrix, map_to_ft
from cryosgd.data.batch import Batch
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import _extract, extract, insert
from cryosgd.model.ctf import CTFParams
from cryosgd.model.forward import ForwardModel
from cryosgd.model.phantom import blob_phantom

INTERPS = ["trilinear", "nearest"]


def _setup(box=24, n=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    grid = FourierGrid.create(box, 1.5)
    angles = torch.rand(n, 3, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    return grid, euler_to_matrix(angles).to(dtype), grid.freq_px.to(dtype), g


def _crandn(*shape, g, dtype=torch.complex128):
    return torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("interp", INTERPS)
def test_insert_is_exact_adjoint_of_extract_in_float64(interp):
    grid, rot, freq, g = _setup()
    x = _crandn(*grid.volume_shape, g=g)
    y = _crandn(rot.shape[0], freq.shape[0], g=g)
    lhs = torch.vdot(extract(x, rot, freq, interp).ravel(), y.ravel()).real
    rhs = torch.vdot(x.ravel(), insert(y, rot, freq, grid.volume_shape, interp).ravel()).real
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


@pytest.mark.parametrize("interp", INTERPS)
def test_autograd_gradient_equals_explicit_adjoint(interp):
    grid, rot, freq, g = _setup(seed=1)
    x = _crandn(*grid.volume_shape, g=g).requires_grad_()
    y = _crandn(rot.shape[0], freq.shape[0], g=g)
    loss = 0.5 * (extract(x, rot, freq, interp) - y).abs().pow(2).sum()
    loss.backward()
    residual = extract(x.detach(), rot, freq, interp) - y
    torch.testing.assert_close(x.grad, insert(residual, rot, freq, grid.volume_shape, interp))


def _full_grid_trilinear(full_ft, points):
    """Independent reference: trilinear on the full complex periodic grid, no symmetry used."""
    n = full_ft.shape[0]
    q = points[..., ::-1]  # (qz, qy, qx)
    base = np.floor(q).astype(int)
    frac = q - base
    out = np.zeros(points.shape[:-1], dtype=complex)
    for corner in np.ndindex(2, 2, 2):
        c = np.array(corner)
        w = np.prod(np.where(c == 1, frac, 1 - frac), axis=-1)
        idx = (base + c) % n
        out += w * full_ft[idx[..., 0], idx[..., 1], idx[..., 2]]
    return out


def test_half_grid_slices_equal_full_grid_trilinear_reference():
    grid, rot, freq, _ = _setup(box=20, seed=2)
    volume = blob_phantom(20, seed=5).astype(np.float64)
    full = np.fft.fftn(np.fft.ifftshift(volume))
    points = np.einsum("pi,bij->bpj", np.c_[freq.numpy(), np.zeros(len(freq))], rot.numpy())
    expected = _full_grid_trilinear(full, points)
    got = extract(map_to_ft(torch.tensor(volume)), rot, freq, "trilinear").numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * np.abs(expected).max())


def test_nearest_at_identity_pose_reads_the_central_plane():
    grid, _, freq, _ = _setup(box=16)
    volume_ft = map_to_ft(torch.tensor(blob_phantom(16, seed=1), dtype=torch.float64))
    values = extract(volume_ft, torch.eye(3, dtype=torch.float64)[None], freq, "nearest")
    torch.testing.assert_close(values[0], grid.take(volume_ft[0]))


def test_compiled_kernel_matches_eager_in_float32():
    grid, rot, freq, g = _setup(box=32, dtype=torch.float32, seed=3)
    x = _crandn(*grid.volume_shape, g=g, dtype=torch.complex64)
    eager = torch.view_as_complex(_extract(torch.view_as_real(x), rot, freq, "trilinear"))
    torch.testing.assert_close(extract(x, rot, freq, "trilinear"), eager, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("interp", INTERPS)
def test_forward_model_with_ctf_and_shifts_has_exact_adjoint(interp):
    grid, rot, freq, g = _setup(seed=4)
    n = rot.shape[0]
    ones = torch.ones(n, dtype=torch.float64)
    ctf = CTFParams(ones * 12000, ones * 11000, ones * 30, ones * 300, ones * 2.7, ones * 0.1, ones * 0,
                    ones * 50, ones)
    batch = Batch(np.arange(n), rot, torch.randn(n, 2, generator=g, dtype=torch.float64) * 3, ctf)
    model = ForwardModel(grid, interp)
    x = _crandn(*grid.volume_shape, g=g)
    y = _crandn(n, freq.shape[0], g=g)
    lhs = torch.vdot(model.forward(x, batch).ravel(), y.ravel()).real
    rhs = torch.vdot(x.ravel(), model.adjoint(y, batch).ravel()).real
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


def test_grid_rejects_radius_reaching_nyquist():
    with pytest.raises(ValueError, match="radius"):
        FourierGrid.create(32, 1.0, radius_px=16)
