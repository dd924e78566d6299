"""The native CPU back-projection kernel (cryosgd.fourier.native) against PyTorch's."""

import warnings

import pytest
import torch

from cryosgd.fourier import native
from cryosgd.fourier import slice as kernels
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import insert_many
from cryosgd.pose.so3 import random_rotations

pytestmark = pytest.mark.skipif(not native.available(torch.zeros(1), (1, 2)), reason="no C compiler here")


def _problem(dtype, n=24, images=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = FourierGrid.create(n, 1.5)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    values = torch.randn(2, images, grid.freq_px.shape[0], generator=g, dtype=complex_dtype)
    curvature = torch.rand(images, grid.freq_px.shape[0], generator=g, dtype=dtype)
    return grid, values, curvature, random_rotations(images, g).to(dtype), grid.freq_px.to(dtype)


def _insert(monkeypatch, use_native: bool, dtype, interp, threads=2):
    monkeypatch.setenv("CRYOSGD_NATIVE", "1" if use_native else "0")
    grid, values, curvature, rotations, freq = _problem(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return insert_many(values, curvature, rotations, freq, grid.volume_shape, interp, (2, 1))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("interp", ["trilinear", "nearest"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_native_back_projection_equals_pytorch(monkeypatch, interp, dtype, tolerance):
    """Complex channels (conjugated where read at −q) and a real one to weight powers 2 and 1."""
    for got, expected in zip(_insert(monkeypatch, True, dtype, interp), _insert(monkeypatch, False, dtype, interp)):
        scale = expected.abs().max()
        assert float((got - expected).abs().max() / scale) < tolerance


def test_native_back_projection_is_reproducible_and_threads_agree(monkeypatch):
    monkeypatch.setattr(native, "_SPLIT_POINTS", 1000)  # several threads even for this small problem
    one = _insert(monkeypatch, True, torch.float64, "trilinear", threads=1)
    two = _insert(monkeypatch, True, torch.float64, "trilinear", threads=3)
    again = _insert(monkeypatch, True, torch.float64, "trilinear", threads=3)
    for a, b, c in zip(one, two, again):
        assert torch.equal(b, c)
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13 * float(a.abs().max()))


def test_without_native_the_pytorch_kernel_back_projects(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_insert_kernel", lambda *args: calls.append(1) or kernels._insert_vectorised(*args))
    _insert(monkeypatch, False, torch.float64, "trilinear")
    assert calls
    calls.clear()
    _insert(monkeypatch, True, torch.float64, "trilinear")
    assert not calls


def test_a_failing_build_warns_once_and_pytorch_takes_over(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYOSGD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    native._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="scatter.c"):
            assert not native.available(torch.zeros(1), (1,))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not native.available(torch.zeros(1), (1,))  # once
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        native._library.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not native.available(torch.zeros(1), (1,))  # no compiler: silently PyTorch
        got = _insert(monkeypatch, True, torch.float64, "trilinear")
        expected = _insert(monkeypatch, False, torch.float64, "trilinear")
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
    finally:
        native._library.cache_clear()
