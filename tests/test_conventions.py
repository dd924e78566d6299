import numpy as np
import torch

from cryosgd.conventions import (euler_to_matrix, ft_to_images, ft_to_map, images_to_ft, map_to_ft,
                                 matrix_to_euler, shift_phase, slice_points)
from cryosgd.sim.phantom import blob_phantom


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])


def _ry(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def test_euler_matrix_is_relion_zyz_product():
    rot, tilt, psi = np.radians([30.0, 50.0, -70.0])
    expected = _rz(psi) @ _ry(tilt) @ _rz(rot)
    got = euler_to_matrix(torch.tensor([30.0, 50.0, -70.0], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-14)


def test_matrix_to_euler_inverts_euler_to_matrix_including_gimbal_lock():
    rng = np.random.default_rng(0)
    angles = np.stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)], 1)
    angles[:2, 1] = [0.0, 180.0]
    mats = euler_to_matrix(torch.tensor(angles))
    back = euler_to_matrix(matrix_to_euler(mats))
    torch.testing.assert_close(back, mats, atol=1e-9, rtol=0)


def test_fourier_round_trips_and_central_slice_theorem():
    v = torch.tensor(blob_phantom(16, seed=2), dtype=torch.float64)
    torch.testing.assert_close(ft_to_map(map_to_ft(v), 16), v)
    img = v.sum(0)
    torch.testing.assert_close(ft_to_images(images_to_ft(img), 16), img)
    torch.testing.assert_close(images_to_ft(img), map_to_ft(v)[0])


def test_slice_points_are_a_transpose_times_k():
    a = euler_to_matrix(torch.tensor([[10.0, 20.0, 30.0]], dtype=torch.float64))
    k = torch.tensor([[3.0, -2.0]], dtype=torch.float64)
    expected = a[0].T @ torch.tensor([3.0, -2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(slice_points(a, k)[0, 0], expected)


def test_shift_phase_moves_image_by_minus_origin():
    img = torch.tensor(blob_phantom(16, seed=3).sum(0), dtype=torch.float64)
    n = 16
    ky, kx = torch.meshgrid(torch.fft.fftfreq(n, dtype=torch.float64), torch.fft.rfftfreq(n, dtype=torch.float64), indexing="ij")
    freq_invA = torch.stack([kx.ravel(), ky.ravel()], -1) / 2.0  # pixel size 2 Å
    origin_A = torch.tensor([[6.0, -4.0]], dtype=torch.float64)  # (+3, −2) px
    moved = images_to_ft(img).ravel() * shift_phase(freq_invA, origin_A)[0]
    result = ft_to_images(moved.reshape(n, n // 2 + 1), n)
    expected = torch.roll(img, shifts=(2, -3), dims=(0, 1))  # centre at box centre − origin
    torch.testing.assert_close(result, expected)
