"""The native CPU slice kernels (cryosgd.fourier.native) against PyTorch's."""

import ctypes
import warnings

import pytest
import torch

from cryosgd.fourier import native
from cryosgd.fourier import slice as kernels
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import extract_many, insert_many
from cryosgd.pose.so3 import random_rotations

pytestmark = pytest.mark.skipif(not native.available(torch.zeros(1), powers=(1, 2)), reason="no C compiler here")


def _problem(dtype, n=24, images=40, seed=0, reach=1.0):
    """Random values at the slice points of random rotations; ``reach`` > 1 scales the
    frequencies beyond the grid's radius n/2 − 1 (and beyond n/2), where stencils are clamped."""
    g = torch.Generator().manual_seed(seed)
    grid = FourierGrid.create(n, 1.5)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    values = torch.randn(2, images, grid.freq_px.shape[0], generator=g, dtype=complex_dtype)
    curvature = torch.rand(images, grid.freq_px.shape[0], generator=g, dtype=dtype)
    return grid, values, curvature, random_rotations(images, g).to(dtype), reach * grid.freq_px.to(dtype)


def _run(monkeypatch, use_native: bool, threads: int, kernel):
    monkeypatch.setenv("CRYOSGD_NATIVE", "1" if use_native else "0")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return kernel()
    finally:
        torch.set_num_threads(before)


def _insert(monkeypatch, use_native: bool, dtype, interp, threads=2, reach=1.0):
    grid, values, curvature, rotations, freq = _problem(dtype, reach=reach)
    return _run(monkeypatch, use_native, threads, lambda: insert_many(values, curvature, rotations, freq,
                                                                      grid.volume_shape, interp, (2, 1)))


def _extract(monkeypatch, use_native: bool, dtype, interp, threads=2, reach=1.0):
    grid, values, _, rotations, freq = _problem(dtype, seed=1, reach=reach)
    maps = torch.randn(3, *grid.volume_shape, dtype=values.dtype, generator=torch.Generator().manual_seed(2))
    return _run(monkeypatch, use_native, threads, lambda: extract_many(maps, rotations, freq, interp))


@pytest.mark.parametrize("interp", ["trilinear", "nearest"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_native_slices_equal_pytorch(monkeypatch, interp, dtype, tolerance):
    """Three maps at once; imaginary parts conjugated where the point is read at −q."""
    got, expected = _extract(monkeypatch, True, dtype, interp), _extract(monkeypatch, False, dtype, interp)
    assert float((got - expected).abs().max() / expected.abs().max()) < tolerance


@pytest.mark.parametrize("interp", ["trilinear", "nearest"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_native_back_projection_equals_pytorch(monkeypatch, interp, dtype, tolerance):
    """Complex channels (conjugated where read at −q) and a real one to weight powers 2 and 1."""
    for got, expected in zip(_insert(monkeypatch, True, dtype, interp), _insert(monkeypatch, False, dtype, interp)):
        scale = expected.abs().max()
        assert float((got - expected).abs().max() / scale) < tolerance


@pytest.mark.parametrize("interp", ["trilinear", "nearest"])
@pytest.mark.parametrize("reach", [1.2, 2.5])  # past the radius n/2 − 1; past n/2 and the grid's edge
def test_points_beyond_the_grid_are_clamped_as_pytorch_clamps_them(monkeypatch, interp, reach):
    for kernel in (_insert, _extract):
        got = kernel(monkeypatch, True, torch.float64, interp, reach=reach)
        expected = kernel(monkeypatch, False, torch.float64, interp, reach=reach)
        for a, b in zip(got, expected):
            assert float((a - b).abs().max() / b.abs().max()) < 1e-13


def test_a_pose_that_is_not_finite_gives_nan_values_and_touches_nothing_else(monkeypatch):
    """PyTorch's kernels raise on such a point (an index out of range); the native ones clamp it
    into the grid like a point beyond it, so it reads and writes only the grid's voxels."""
    monkeypatch.setenv("CRYOSGD_NATIVE", "1")
    grid, values, curvature, rotations, freq = _problem(torch.float64)
    rotations[3, 0, 0] = torch.nan
    maps = torch.randn(1, *grid.volume_shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    sliced = extract_many(maps, rotations, freq)[0]
    assert bool(sliced[3].isnan().any()) and bool(sliced[torch.arange(40) != 3].isfinite().all())
    inserted, _ = insert_many(values[:1], None, rotations, freq, grid.volume_shape)
    assert bool(inserted.isnan().any())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_rotation_that_is_not_finite_writes_nothing_outside_the_grid(bad):
    """Every point of a rotation all NaN or infinite clamps into the grid: the guard bands on
    both sides of the C scatter's accumulator stay zero (its x index goes to 0, not below)."""
    n, points, guard = 16, 5, 64
    size = (n + 1) ** 2 * (n // 2 + 1)
    rotation = torch.full((1, 3, 3), bad, dtype=torch.float64)
    freq = torch.tensor([[1.0, 2.0]] * points, dtype=torch.float64)
    values = torch.ones(1, 1, points, dtype=torch.float64)
    buffer = torch.zeros(guard + size + guard, dtype=torch.float64)
    flags = [(ctypes.c_int * 1)(0), (ctypes.c_int * 1)(1)]
    native._library().scatter_double(
        native._ptr(rotation), native._ptr(freq), native._int(points), native._ptr(values), native._int(1),
        native._int(points), None, None, *flags, ctypes.c_int(0), native._int(n), native._ptr(buffer[guard:]),
        native._int(0), native._int(points))
    assert bool((buffer[:guard] == 0).all()) and bool((buffer[-guard:] == 0).all())
    assert not bool(buffer[guard:-guard].isfinite().all())


@pytest.mark.parametrize("use_native", [True, False])
def test_no_rows_back_project_nothing(monkeypatch, use_native):
    """A process's empty share of a batch has no rows: zero maps, with or without ``source``."""
    grid, values, curvature, rotations, freq = _problem(torch.float64)
    for source in (None, torch.zeros(0, dtype=torch.long)):
        maps, real = _run(monkeypatch, use_native, 2, lambda: insert_many(
            values[:, :0] if source is None else values, curvature[:0] if source is None else curvature,
            rotations[:0], freq, grid.volume_shape, "trilinear", (2, 1), source))
        assert not bool(maps.any()) and not bool(real.any())


def test_mismatched_shapes_are_refused_not_read_past(monkeypatch):
    grid, values, curvature, rotations, freq = _problem(torch.float64)
    monkeypatch.setenv("CRYOSGD_NATIVE", "1")
    with pytest.raises(ValueError, match="do not match"):
        insert_many(values, curvature, rotations[:10], freq, grid.volume_shape)


def test_native_kernels_are_reproducible_and_threads_agree(monkeypatch):
    monkeypatch.setattr(native, "_SPLIT_POINTS", 1000)  # several threads even for this small problem
    for kernel in (_insert, _extract):
        one = kernel(monkeypatch, True, torch.float64, "trilinear", threads=1)
        two = kernel(monkeypatch, True, torch.float64, "trilinear", threads=3)
        again = kernel(monkeypatch, True, torch.float64, "trilinear", threads=3)
        for a, b, c in zip(one, two, again):
            assert torch.equal(b, c)
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13 * float(a.abs().max()))


def test_without_native_or_for_autograd_the_pytorch_kernels_run(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_insert_kernel", lambda *args: calls.append(1) or kernels._insert_vectorised(*args))
    monkeypatch.setattr(kernels, "_extract_kernel", lambda *a: calls.append(2) or kernels._extract_vectorised(*a))
    _insert(monkeypatch, False, torch.float64, "trilinear")
    _extract(monkeypatch, False, torch.float64, "trilinear")
    assert calls == [1, 2]
    calls.clear()
    _insert(monkeypatch, True, torch.float64, "trilinear")
    _extract(monkeypatch, True, torch.float64, "trilinear")
    assert not calls
    grid, _, _, rotations, freq = _problem(torch.float64)
    volume_ft = torch.randn(grid.volume_shape, dtype=torch.complex128, requires_grad=True)
    extract_many(volume_ft[None], rotations, freq).abs().sum().backward()
    assert calls == [2] and volume_ft.grad.abs().sum() > 0


def test_an_unloadable_library_in_the_cache_is_built_again(monkeypatch, tmp_path):
    """A truncated or foreign file under the library's name (a fresh folder: a loaded library
    must not change under its process)."""
    monkeypatch.setenv("CRYOSGD_CACHE", str(tmp_path / "first"))
    native._library.cache_clear()
    try:
        assert native._library() is not None
        (name,) = (p.name for p in (tmp_path / "first").iterdir())
        (tmp_path / "second").mkdir()
        library = tmp_path / "second" / name
        library.write_bytes(b"not a shared library")
        monkeypatch.setenv("CRYOSGD_CACHE", str(tmp_path / "second"))
        native._library.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native._library() is not None
        assert library.read_bytes()[:4] == b"\x7fELF" and list(library.parent.iterdir()) == [library]
    finally:
        native._library.cache_clear()


def test_a_failing_build_warns_once_and_pytorch_takes_over(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYOSGD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    native._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="trilinear.c"):
            assert not native.available(torch.zeros(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not native.available(torch.zeros(1))  # once
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        native._library.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not native.available(torch.zeros(1))  # no compiler: silently PyTorch
        for kernel in (_insert, _extract):
            got = kernel(monkeypatch, True, torch.float64, "trilinear")
            expected = kernel(monkeypatch, False, torch.float64, "trilinear")
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize("use_native", [True, False])
def test_rows_back_project_their_images_values_times_their_weights(monkeypatch, use_native):
    """``source`` and ``scale``: row r scatters image source[r]'s values times scale[r], as if
    the values had been repeated and scaled row by row."""
    grid, values, curvature, _, freq = _problem(torch.float64)
    g = torch.Generator().manual_seed(5)
    source, scale = torch.randint(0, 40, (70,), generator=g), torch.rand(70, generator=g, dtype=torch.float64)
    rotations = random_rotations(70, g).to(torch.float64)
    got = _run(monkeypatch, use_native, 2, lambda: insert_many(values, curvature, rotations, freq, grid.volume_shape,
                                                               "trilinear", (2, 1), source, scale))
    expected = _run(monkeypatch, False, 1, lambda: insert_many(values[:, source] * scale[:, None],
                                                               curvature[source] * scale[:, None], rotations, freq,
                                                               grid.volume_shape, "trilinear", (2, 1)))
    for a, b in zip(got, expected):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-13


def test_a_row_of_an_image_that_is_not_there_is_refused(monkeypatch):
    grid, values, curvature, rotations, freq = _problem(torch.float64)
    monkeypatch.setenv("CRYOSGD_NATIVE", "1")
    for source in (torch.full((40,), 40), torch.full((40,), -1)):
        with pytest.raises(ValueError, match="do not match"):
            insert_many(values, curvature, rotations, freq, grid.volume_shape, source=source)
