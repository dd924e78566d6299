"""MRC maps and MRCS image stacks: memory-mapped reads, atomic writes with voxel size.

Arrays are in MRC order: maps ``[z, y, x]``, stacks ``[image, y, x]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import numpy as np

from cryosgd.errors import InputError
from cryosgd.io.atomic import atomic_path


def open_mrc(path: str | Path) -> mrcfile.mrcmemmap.MrcMemmap:
    """Open an MRC/MRCS file read-only as a memory map; one-line error if it is not MRC."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        return mrcfile.mmap(path, mode="r", permissive=False)
    except (ValueError, OSError) as err:
        raise InputError(path, f"not a valid MRC file ({err})") from None


def read_map(path: str | Path, need_voxel_size: bool = True) -> tuple[np.ndarray, float]:
    """Read a cubic 3D map → (``[z, y, x]`` float32 array, voxel size in Å).

    A voxel size ≤ 0 in the header is an error unless ``need_voxel_size`` is False (a mask).
    """
    with open_mrc(path) as mrc:
        data = np.array(mrc.data, dtype=np.float32)
        voxel_A = float(mrc.voxel_size.x)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(path, f"expected a cubic 3D map, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(path, "map contains NaN or infinite values")
    if need_voxel_size and not voxel_A > 0:
        raise InputError(path, f"voxel size {voxel_A:g} Å in the header (must be positive; set it, e.g. with "
                               "relion_image_handler --angpix)")
    return data, voxel_A


def check_voxel_size(path: str | Path, voxel_A: float, expected_A: float, whose: str) -> None:
    """Refuse a map (``path``) whose header voxel size ``voxel_A`` differs by more than 0.1 % from
    ``expected_A``; ``whose`` names what the map goes with, possessive (``"the particles'"``,
    ``"half1.mrc's"``). A mask's 0 (not set) passes."""
    if voxel_A > 0 and abs(voxel_A - expected_A) > 1e-3 * expected_A:
        raise InputError(path, f"voxel size {voxel_A:g} Å differs from {whose} {expected_A:g} Å (if the header is "
                               "wrong, set it with relion_image_handler --angpix)")


def write_map(path: str | Path, data: np.ndarray, voxel_A: float) -> None:
    """Write a float32 map or stack with its voxel size (Å), atomically.

    The header origin is 0; the map centre is voxel ``n // 2`` (RELION's convention).
    A 3D array whose name ends in ``.mrcs`` is written as an image stack.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if str(path).endswith(".mrcs") and data.ndim == 3:
                mrc.set_image_stack()
            mrc.voxel_size = voxel_A
            mrc.update_header_stats()


@contextlib.contextmanager
def new_stack(path: str | Path, n_images: int, box_px: int, voxel_A: float) -> Iterator[np.ndarray]:
    """Yield a writable ``(n_images, box, box)`` float32 memory map; publish it atomically.

    The stack is filled batch by batch, so it never has to fit in memory; the file
    appears at ``path`` only when the ``with`` block completes.
    """
    with atomic_path(path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(n_images, box_px, box_px), mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = voxel_A
            yield mrc.data
            mrc.update_header_stats()
