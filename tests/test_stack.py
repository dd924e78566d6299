import numpy as np
import pytest

from cryosgd.data.particles import read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.errors import InputError
from cryosgd.io.mrc import write_map

from conftest import random_particles


def _dataset(tmp_path, n=4, box=16, names="stack.mrcs", images=None):
    table = random_particles(n, box, 1.5, names=names)
    write_particles(tmp_path / "p.star", table)
    if images is None:
        images = np.random.default_rng(0).normal(size=(n, box, box))
    write_map(tmp_path / "stack.mrcs", images, 1.5)
    return read_particles(tmp_path / "p.star")


def test_reads_images_by_particle_index_from_star_folder(tmp_path, monkeypatch):
    images = np.random.default_rng(1).normal(size=(4, 16, 16)).astype(np.float32)
    table = _dataset(tmp_path, images=images)
    monkeypatch.chdir("/")
    stack = ImageStack(table)
    np.testing.assert_array_equal(stack.read(np.array([3, 0, 2])), images[[3, 0, 2]])


def test_image_index_past_end_of_stack(tmp_path):
    table = _dataset(tmp_path, images=np.zeros((3, 16, 16)))
    with pytest.raises(InputError, match=r"stack\.mrcs: rlnImageName: image index 4 past the end"):
        ImageStack(table)


def test_stacks_of_mixed_box_size(tmp_path):
    table = _dataset(tmp_path)
    write_map(tmp_path / "other.mrcs", np.zeros((4, 20, 20)), 1.5)
    table.image_name[1] = "000002@other.mrcs"
    with pytest.raises(InputError, match=r"p\.star: rlnImageName: stacks of mixed box size \[16, 20\]"):
        ImageStack(table)


def test_missing_stack_and_non_mrc_file(tmp_path):
    table = _dataset(tmp_path)
    table.image_name[0] = "000001@missing.mrcs"
    with pytest.raises(InputError, match=r"missing\.mrcs: file not found"):
        ImageStack(table)
    (tmp_path / "junk.mrcs").write_bytes(b"this is not an MRC file" * 100)
    table.image_name[0] = "000001@junk.mrcs"
    with pytest.raises(InputError, match=r"junk\.mrcs: not a valid MRC file"):
        ImageStack(table)


def test_nan_pixels_name_the_stack_and_image(tmp_path):
    images = np.zeros((4, 16, 16), dtype=np.float32)
    images[2, 5, 5] = np.nan
    stack = ImageStack(_dataset(tmp_path, images=images))
    with pytest.raises(InputError, match=r"stack\.mrcs: image 3: NaN"):
        stack.read(np.arange(4))


def test_malformed_image_name(tmp_path):
    table = _dataset(tmp_path)
    table.image_name[0] = "stack.mrcs"
    with pytest.raises(InputError, match="not of the form index@stack"):
        ImageStack(table)
