import subprocess
import sys

import numpy as np
import pytest
import torch

from cryosgd import compiled
from cryosgd.compiled import maybe_compile
from cryosgd.conventions import euler_to_matrix, map_to_ft, slice_points
from cryosgd.data.batch import Batch, CTFParams
from cryosgd.fourier import slice as kernels
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import extract, extract_many, insert, insert_many, stencil
from cryosgd.model.forward import ForwardModel
from cryosgd.sim.phantom import blob_phantom

INTERPS = ["trilinear", "nearest"]


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    """The maths runs eagerly unless a test asks for the compiled kernels."""
    monkeypatch.setenv("CRYOSGD_COMPILE", "0")


def _setup(box=24, n=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    grid = FourierGrid.create(box, 1.5)
    angles = torch.rand(n, 3, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0])
    return grid, euler_to_matrix(angles).to(dtype), grid.freq_px.to(dtype), g


def _crandn(*shape, g, dtype=torch.complex128):
    return torch.randn(*shape, generator=g, dtype=dtype)


def _adjoint_mismatch(interp, seed=0):
    """Relative |⟨extract x, y⟩ − ⟨x, insert y⟩| in float64."""
    grid, rot, freq, g = _setup(seed=seed)
    x = _crandn(*grid.volume_shape, g=g)
    y = _crandn(rot.shape[0], freq.shape[0], g=g)
    lhs = torch.vdot(extract(x, rot, freq, interp).ravel(), y.ravel()).real
    rhs = torch.vdot(x.ravel(), insert(y, rot, freq, grid.volume_shape, interp).ravel()).real
    return abs(lhs - rhs) / abs(lhs)


@pytest.mark.parametrize("interp", INTERPS)
@pytest.mark.parametrize("use_native", ["1", "0"])  # the C scatter (where there is a compiler), PyTorch's
def test_insert_is_exact_adjoint_of_extract_in_float64(interp, use_native, monkeypatch):
    monkeypatch.setenv("CRYOSGD_NATIVE", use_native)
    assert _adjoint_mismatch(interp) < 1e-10


@pytest.fixture
def compiled_kernels(monkeypatch):
    """The slice kernels compiled at their first call, in fresh wrappers that the test leaves behind.

    Call the returned function after the kernels ran: it skips the test where torch.compile
    cannot work (the kernels then fell back to eager). PyTorch's kernels, not the native ones;
    on the CPU the scatter stays eager (its compiled form is for CUDA).
    """
    monkeypatch.setenv("CRYOSGD_COMPILE", "1")
    monkeypatch.setenv("CRYOSGD_NATIVE", "0")
    fresh = {}
    for name in ("_extract_kernel", "_insert_kernel"):
        tiered = getattr(kernels, name)
        fresh[name] = maybe_compile(tiered.eager_fn, tiered.compile_fn, on_cpu=tiered.on_cpu)
        monkeypatch.setattr(kernels, name, fresh[name])

    def skip_unless_compiled():
        if fresh["_extract_kernel"].compiled is None:
            pytest.skip("torch.compile does not work here")
    return skip_unless_compiled


@pytest.mark.parametrize("interp", INTERPS)
def test_compiled_insert_is_exact_adjoint_of_compiled_extract_in_float64(interp, compiled_kernels):
    mismatch = _adjoint_mismatch(interp)
    compiled_kernels()
    assert mismatch < 1e-10


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


def _periodic_stencil(points, n, interp):
    """Reference stencil on the FFT layout: corners wrapped modulo n, read at −q where qx < 0."""
    nh = n // 2 + 1
    sign = np.where(points[:, 0] < 0, -1.0, 1.0)
    q = points * sign[:, None]
    if interp == "nearest":
        corners, weights = [np.floor(q + 0.5).astype(int)], [np.ones(len(q))]
    else:
        base = np.floor(q).astype(int)
        frac = q - base
        corners, weights = [], []
        for c in np.ndindex(2, 2, 2):
            c = np.array(c)[::-1]  # (dx, dy, dz)
            corners.append(base + c)
            weights.append(np.prod(np.where(c == 1, frac, 1 - frac), axis=-1))
    dense = np.zeros((len(q), n * n * nh))
    for (x, y, z), w in zip((c.T for c in corners), weights):
        np.add.at(dense, (np.arange(len(q)), ((z % n) * n + y % n) * nh + x), w)
    return dense, sign


@pytest.mark.parametrize("interp", INTERPS)
def test_points_at_the_radius_and_a_hair_beyond_wrap_onto_the_nyquist_rows(interp):
    n, h, e = 16, 7.0, 1e-9  # |q| ≤ n/2 − 1 = 7; rounding may overshoot it by a few ulps
    freq = torch.tensor([[h + e, -e], [-h - e, 0], [0, h + e], [0, -h - e], [-0.0, -h - e], [-1e-12, 3.3],
                         [2.5, -4.5], [-3.5, 1.5]], dtype=torch.float64)
    rot = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 0, 1], [0, -1, 0]]],
                       dtype=torch.float64)  # the image's ky along the map's qy, then along qz
    shape = (n, n, n // 2 + 1)
    points = slice_points(rot, freq)
    expected, flipped = _periodic_stencil(points.reshape(-1, 3).numpy(), n, interp)
    index, weight, sign = stencil(points, shape, interp)
    dense = torch.zeros(points.shape[0] * points.shape[1], n * n * (n // 2 + 1), dtype=torch.float64)
    dense.scatter_add_(1, index.reshape(len(dense), -1), weight.reshape(len(dense), -1))
    np.testing.assert_allclose(dense.numpy(), expected, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(sign.ravel().numpy(), flipped)
    g = torch.Generator().manual_seed(8)
    x, y = _crandn(*shape, g=g), _crandn(*points.shape[:2], g=g)
    conj_where_flipped = lambda v: np.where(flipped < 0, np.conj(v), v)  # noqa: E731
    np.testing.assert_allclose(extract(x, rot, freq, interp).ravel().numpy(),
                               conj_where_flipped(expected @ x.ravel().numpy()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(insert(y, rot, freq, shape, interp).ravel().numpy(),
                               expected.T @ conj_where_flipped(y.ravel().numpy()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("interp", INTERPS)
def test_extract_reads_the_stencil_voxels_conjugated_where_flipped(interp):
    grid, rot, freq, g = _setup(seed=6)
    x = _crandn(*grid.volume_shape, g=g)
    index, weight, sign = stencil(slice_points(rot, freq), grid.volume_shape, interp)
    read = (weight * x.ravel()[index]).sum(-1)
    expected = torch.where(sign < 0, read.conj(), read)
    torch.testing.assert_close(extract(x, rot, freq, interp), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("interp", INTERPS)
def test_extract_many_equals_one_extract_per_map(interp, monkeypatch):
    grid, rot, freq, g = _setup(seed=8)
    maps = _crandn(3, *grid.volume_shape, g=g)
    monkeypatch.setattr(kernels, "_EAGER_CHUNK_POINTS", 6 * len(freq))  # chunks of 2 images of 3 channels
    got = extract_many(maps, rot, freq, interp)
    assert got.shape == (3, rot.shape[0], freq.shape[0])
    for value, volume_ft in zip(got, maps):
        torch.testing.assert_close(value, extract(volume_ft, rot, freq, interp), rtol=0, atol=1e-12)


@pytest.mark.parametrize("interp", INTERPS)
def test_chunks_of_images_give_the_same_slices_and_maps(interp, monkeypatch):
    grid, rot, freq, g = _setup(seed=9)
    x = _crandn(*grid.volume_shape, g=g)
    y = _crandn(2, rot.shape[0], freq.shape[0], g=g)
    c2 = torch.rand(rot.shape[0], freq.shape[0], generator=g, dtype=torch.float64)
    def run():
        return extract(x, rot, freq, interp), *insert_many(y, c2, rot, freq, grid.volume_shape, interp, (1, 2))
    monkeypatch.setenv("CRYOSGD_NATIVE", "0")  # PyTorch's scatter, which works in chunks
    whole = run()
    monkeypatch.setattr(kernels, "_EAGER_CHUNK_POINTS", 2 * len(freq))  # chunks of 2 images, of 3 in insert_many
    monkeypatch.setattr(kernels, "_SCATTER_CHUNK_POINTS", 3 * len(freq))
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_nearest_at_identity_pose_reads_the_central_plane():
    grid, _, freq, _ = _setup(box=16)
    volume_ft = map_to_ft(torch.tensor(blob_phantom(16, seed=1), dtype=torch.float64))
    values = extract(volume_ft, torch.eye(3, dtype=torch.float64)[None], freq, "nearest")
    torch.testing.assert_close(values[0], grid.take(volume_ft[0]))


def test_compiled_kernels_match_eager_ones_in_float32(compiled_kernels, monkeypatch):
    grid, rot, freq, g = _setup(dtype=torch.float32, seed=3)  # the shapes of the float64 tests: no recompiling
    x = _crandn(*grid.volume_shape, g=g, dtype=torch.complex64)
    y = _crandn(rot.shape[0], freq.shape[0], g=g, dtype=torch.complex64)
    run = lambda: (extract(x, rot, freq), insert(y, rot, freq, grid.volume_shape))  # noqa: E731
    monkeypatch.setenv("CRYOSGD_COMPILE", "0")
    eager = run()
    monkeypatch.setenv("CRYOSGD_COMPILE", "1")
    got = run()
    compiled_kernels()
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


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


# Tiered compilation (cryosgd.compiled), with a stand-in for torch.compile.

class _FakeCompiler:
    """``torch.compile`` stand-in: counts compilations and calls; ``broken`` ones raise when called."""

    def __init__(self, broken=False):
        self.compiled, self.calls, self.broken = 0, 0, broken

    def __call__(self, fn):
        self.compiled += 1

        def run(*args):
            self.calls += 1
            if self.broken:
                raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(details)")
            return fn(*args)
        return run


@pytest.fixture
def fake_compiler(monkeypatch):
    def install(broken=False):
        fake = _FakeCompiler(broken)
        monkeypatch.setattr(torch, "compile", fake)
        monkeypatch.setattr(compiled, "_warned", False)
        monkeypatch.setattr(compiled, "cpu_compiler_available", lambda: True)
        return fake
    return install


def _double(x):
    return 2 * x


def _double_for_compiler(x):
    return x + x


def test_auto_runs_eagerly_until_the_eager_time_passes_the_threshold(fake_compiler, monkeypatch):
    fake = fake_compiler()
    monkeypatch.setenv("CRYOSGD_COMPILE", "auto")
    monkeypatch.setenv("CRYOSGD_COMPILE_AFTER_S", "3600")
    kernel = maybe_compile(_double, _double_for_compiler)
    for _ in range(3):
        assert kernel(torch.ones(3)).tolist() == [2.0] * 3
    assert (fake.compiled, fake.calls) == (0, 0)
    monkeypatch.setenv("CRYOSGD_COMPILE_AFTER_S", "0")
    kernel(torch.ones(3))
    kernel(torch.ones(3))
    assert (fake.compiled, fake.calls) == (1, 2)


def test_compile_setting_1_compiles_at_the_first_call_and_0_never(fake_compiler, monkeypatch):
    fake = fake_compiler()
    monkeypatch.setenv("CRYOSGD_COMPILE_AFTER_S", "0")
    kernel = maybe_compile(_double)
    for _ in range(3):
        kernel(torch.ones(3))
    assert fake.compiled == 0
    monkeypatch.setenv("CRYOSGD_COMPILE", "1")
    fresh = maybe_compile(_double)
    fresh(torch.ones(3))
    assert (fake.compiled, fake.calls) == (1, 1)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(fake_compiler, monkeypatch):
    fake = fake_compiler(broken=True)
    monkeypatch.setenv("CRYOSGD_COMPILE", "1")
    kernel, other = maybe_compile(_double), maybe_compile(_double_for_compiler)
    with pytest.warns(RuntimeWarning, match="torch.compile failed for _double .*running it eagerly") as caught:
        assert kernel(torch.ones(3)).tolist() == [2.0] * 3
        assert kernel(torch.ones(3)).tolist() == [2.0] * 3
        assert other(torch.ones(3)).tolist() == [2.0] * 3
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert (fake.compiled, fake.calls) == (2, 2)  # each function tried once, then eager for good


def test_a_failing_compiled_slice_kernel_still_returns_the_eager_values(fake_compiler, compiled_kernels,
                                                                        monkeypatch):
    grid, rot, freq, g = _setup(seed=7)
    x = _crandn(*grid.volume_shape, g=g)
    y = _crandn(rot.shape[0], freq.shape[0], g=g)
    run = lambda: (extract(x, rot, freq), insert(y, rot, freq, grid.volume_shape))  # noqa: E731
    monkeypatch.setenv("CRYOSGD_COMPILE", "0")
    expected = run()
    fake_compiler(broken=True)
    monkeypatch.setenv("CRYOSGD_COMPILE", "1")
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = run()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_argument_errors_propagate_and_keep_the_compiled_function(fake_compiler, monkeypatch):
    fake = fake_compiler()
    monkeypatch.setenv("CRYOSGD_COMPILE", "1")
    kernel = maybe_compile(_double)
    with pytest.raises(TypeError):
        kernel("not a tensor", 2)
    kernel(torch.ones(3))
    assert (fake.compiled, fake.calls) == (1, 2)


def test_importing_the_model_does_not_import_the_compiler():
    code = ("import sys, cryosgd.fourier.slice, cryosgd.model.forward, cryosgd.model.ctf; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_without_a_compiler_and_for_the_cpu_scatter_kernels_stay_eager_without_a_word(fake_compiler, monkeypatch):
    import warnings
    fake = fake_compiler()
    monkeypatch.setenv("CRYOSGD_COMPILE", "1")
    monkeypatch.setattr(compiled, "cpu_compiler_available", lambda: False)
    kernel = maybe_compile(_double)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel(torch.ones(3)).tolist() == [2.0] * 3
    assert fake.compiled == 0
    monkeypatch.setattr(compiled, "cpu_compiler_available", lambda: True)
    scatter = maybe_compile(_double, on_cpu=False)
    scatter(torch.ones(3))
    assert fake.compiled == 0
    kernel(torch.ones(3))
    assert fake.compiled == 1
