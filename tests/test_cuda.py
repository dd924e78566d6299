"""The commands on a CUDA device give what they give on the CPU (skipped without a GPU).

Each test compares a CUDA run with the same run on the CPU: PyTorch's CUDA kernels against
the CPU's native ones, through the same formulas.
"""

import numpy as np
import pytest
import torch

from cryosgd import api
from cryosgd.analysis.conditioning import HessianSettings
from cryosgd.conventions import euler_to_matrix
from cryosgd.data.particles import read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.data.store import ParticleStore
from cryosgd.fourier.grids import FourierGrid
from cryosgd.io.mrc import read_map
from cryosgd.pose.so3 import geodesic_distance_deg
from cryosgd.pose.symmetry import symmetry_grid, symmetry_group
from cryosgd.recon.settings import RefineSettings
from cryosgd.resources import available_memory_bytes

from conftest import blob_dataset, correlation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

BOX, PIXEL_A = 40, 3.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return blob_dataset(tmp_path_factory.mktemp("cuda"), 1200, BOX, PIXEL_A)


def test_reconstruct_on_cuda_equals_the_cpu(dataset, tmp_path):
    star, _ = dataset
    maps = {}
    for device in ("cpu", "cuda"):
        api.reconstruct(star, tmp_path / device, device=device, show_progress=False)
        maps[device] = read_map(tmp_path / device / "map.mrc")[0]
    error = np.linalg.norm(maps["cuda"] - maps["cpu"]) / np.linalg.norm(maps["cpu"])
    assert error < 1e-3, error


def test_refine_on_cuda_finds_the_cpu_poses(dataset, tmp_path):
    star, truth = dataset
    table = read_particles(star)
    table.angles_deg, table.shift_A = None, np.zeros_like(table.shift_A)
    write_particles(star.parent / "no_poses.star", table)  # beside the images it names
    settings = RefineSettings(max_iter=3, batch_size=400)
    found = {}
    for device in ("cpu", "cuda"):
        api.refine(star.parent / "no_poses.star", truth, tmp_path / device, settings, device=device,
                   show_progress=False)
        found[device] = (read_particles(tmp_path / device / "particles.star"),
                         read_map(tmp_path / device / "map.mrc")[0])
    (cpu, cpu_map), (gpu, gpu_map) = found["cpu"], found["cuda"]
    apart_deg = geodesic_distance_deg(euler_to_matrix(torch.tensor(cpu.angles_deg)),
                                      euler_to_matrix(torch.tensor(gpu.angles_deg)))
    assert (apart_deg < 1.0).double().mean() > 0.95, apart_deg.median()
    assert correlation(cpu_map, gpu_map) > 0.99


def test_hessian_on_cuda_equals_the_cpu(dataset, tmp_path):
    star, _ = dataset
    settings = HessianSettings(lanczos_iterations=3, lanczos_radii=2)
    reports = {device: api.hessian(star, tmp_path / device, settings, device=device) for device in ("cpu", "cuda")}
    np.testing.assert_allclose(reports["cuda"].kappa_diagonal, reports["cpu"].kappa_diagonal, rtol=1e-6)
    profiles = [np.loadtxt(tmp_path / d / "radial_profile.csv", delimiter=",", skiprows=1) for d in ("cpu", "cuda")]
    np.testing.assert_allclose(profiles[1], profiles[0], rtol=1e-6)
    for radius, kappas in reports["cpu"].lanczos.items():
        np.testing.assert_allclose(reports["cuda"].lanczos[radius], kappas, rtol=1e-3)


@pytest.mark.parametrize("sym", ["C1", "C4", "D2", "T", "O", "I"])
def test_the_symmetry_grid_on_cuda_in_float32_is_the_cpu_grid(sym):
    cpu = symmetry_grid(2, symmetry_group(sym))
    gpu = symmetry_grid(2, symmetry_group(sym).to("cuda", torch.float32))
    assert len(gpu) == len(cpu)
    torch.testing.assert_close(gpu.matrices.cpu().double(), cpu.matrices, atol=1e-6, rtol=0)


def test_the_auto_store_on_cuda_is_sized_by_the_gpu_memory(dataset, monkeypatch):
    star, _ = dataset
    assert abs(available_memory_bytes(torch.device("cuda")) - torch.cuda.mem_get_info()[0]) < 2**30
    stack = ImageStack(read_particles(star))
    grid = FourierGrid.create(stack.box_px, PIXEL_A, None)
    store = ParticleStore(stack, grid, device=torch.device("cuda"))
    assert store.resident
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (store.nbytes, store.nbytes))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    assert not ParticleStore(stack, grid, device=torch.device("cuda")).resident
