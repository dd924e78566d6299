"""ImageStack: the particle images behind ``rlnImageName``, memory-mapped.

``rlnImageName`` is ``index@path`` with a 1-based index; a relative path is resolved
against the STAR file's folder, or else against the working directory (where RELION
resolves it: its project folder). Headers are validated once through memory maps; images
are then read with ``pread`` one run of consecutive images at a time, so a dataset larger
than RAM is read batch by batch and the stack's pages never count as the process's memory.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np

from cryosgd.data.particles import ParticleTable
from cryosgd.errors import InputError
from cryosgd.io.mrc import open_mrc


def _resolve(name: str, root: Path) -> Path:
    path = root / name
    return path if path.exists() or Path(name).is_absolute() or not Path(name).exists() else Path(name)


def referenced_stacks(table: ParticleTable, root: str | Path | None = None) -> list[Path]:
    """The stack files the table's ``rlnImageName`` names, resolved as :class:`ImageStack` does
    (whether or not they exist)."""
    if table.image_name is None:
        return []
    root = Path(root) if root is not None else (table.source or Path("particles.star")).parent
    return [_resolve(rel, root) for rel in dict.fromkeys(name.partition("@")[2] for name in table.image_name)]


def _sample_digest(path: Path, blocks: int = 16, block_bytes: int = 4096) -> str:
    size = path.stat().st_size
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        offsets = {0, max(0, size - block_bytes), *(int(size * (i + 1) / (blocks + 1)) for i in range(blocks))}
        for offset in sorted(offsets):
            f.seek(offset)
            sha.update(f.read(block_bytes))
    return sha.hexdigest()[:16]


class ImageStack:
    """Read-only, memory-mapped access to the images of a :class:`ParticleTable`."""

    def __init__(self, table: ParticleTable, root: str | Path | None = None):
        source = table.source or Path("particles.star")
        if table.image_name is None:
            raise InputError(source, "missing column rlnImageName")
        root = Path(root) if root is not None else source.parent
        self.paths: list[Path] = []
        stack_of: dict[str, int] = {}
        self.stack_id = np.empty(len(table), dtype=np.int64)
        self.slot = np.empty(len(table), dtype=np.int64)
        for i, name in enumerate(table.image_name):
            number, sep, rel = name.partition("@")
            if not sep or not number.strip().isdigit() or int(number) < 1:
                raise InputError(source, f"rlnImageName: '{name}' is not of the form index@stack")
            if rel not in stack_of:
                stack_of[rel] = len(self.paths)
                self.paths.append(_resolve(rel, root))
            self.stack_id[i], self.slot[i] = stack_of[rel], int(number) - 1
        maps = [open_mrc(p) for p in self.paths]
        try:
            self.box_px = self._validate(source, maps)
            self._layout = [(int(mrc.header.nsymbt) + 1024, mrc.data.dtype) for mrc in maps]
        finally:
            for mrc in maps:
                mrc.close()
        self._files: dict[int, int] = {}

    def _validate(self, source: Path, maps) -> int:
        shapes = {}
        for path, mrc in zip(self.paths, maps):
            data = mrc.data
            shape = data.shape if data.ndim == 3 else (1, *data.shape)
            if shape[1] != shape[2]:
                raise InputError(path, f"images are not square ({shape[2]}x{shape[1]})")
            shapes[path] = shape
        boxes = {s[1] for s in shapes.values()}
        if len(boxes) > 1:
            raise InputError(source, f"rlnImageName: stacks of mixed box size {sorted(boxes)}")
        for k, path in enumerate(self.paths):
            slots = self.slot[self.stack_id == k]
            if slots.max() >= shapes[path][0]:
                raise InputError(path, f"rlnImageName: image index {slots.max() + 1} past the end "
                                       f"of the stack ({shapes[path][0]} images)")
        return boxes.pop()

    def __len__(self) -> int:
        return len(self.slot)

    def files(self) -> list[tuple[str, int, str]]:
        """(resolved path, size in bytes, digest of a sample of its bytes) of every stack: what
        identifies the images. The sample (the header and 16 blocks of 4 KiB spread over the
        file) is read in milliseconds whatever the stack's size, and tells a stack rewritten
        with other images from the one a checkpoint was made from."""
        return [(str(p.resolve()), p.stat().st_size, _sample_digest(p)) for p in self.paths]

    def subset(self, index: np.ndarray) -> ImageStack:
        """The images of particles ``index``, in that order (for ``ParticleTable.subset``)."""
        view = copy.copy(self)
        view.stack_id, view.slot = self.stack_id[index], self.slot[index]
        return view

    def read(self, index: np.ndarray) -> np.ndarray:
        """Images of particles ``index`` → ``(B, box, box)`` float32, [y, x]."""
        index = np.asarray(index)
        out = np.empty((len(index), self.box_px, self.box_px), dtype=np.float32)
        for row, k, first, count in self._runs(index):
            out[row:row + count] = self._read_run(k, first, count)
            bad = ~np.isfinite(out[row:row + count]).all(axis=(1, 2))
            if bad.any():
                raise InputError(self.paths[k], f"image {first + bad.argmax() + 1}: NaN or infinite pixel values")
        return out

    def _runs(self, index: np.ndarray):
        """(output row, stack, first slot, count) for each run of consecutive images."""
        stacks, slots = self.stack_id[index], self.slot[index]
        breaks = np.nonzero((np.diff(stacks) != 0) | (np.diff(slots) != 1))[0] + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(index)]])
        return [(int(a), int(stacks[a]), int(slots[a]), int(b - a)) for a, b in zip(starts, ends)]

    def _read_run(self, k: int, first: int, count: int) -> np.ndarray:
        if k not in self._files:
            self._files[k] = os.open(self.paths[k], os.O_RDONLY)
        offset, dtype = self._layout[k]
        size = self.box_px * self.box_px * dtype.itemsize
        data = os.pread(self._files[k], size * count, offset + size * first)
        if len(data) != size * count:
            raise InputError(self.paths[k], f"image {first + count}: file ends early (truncated stack)")
        return np.frombuffer(data, dtype=dtype).reshape(count, self.box_px, self.box_px)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
