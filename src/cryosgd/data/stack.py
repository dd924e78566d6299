"""ImageStack: the particle images behind ``rlnImageName``, memory-mapped.

``rlnImageName`` is ``index@path`` with a 1-based index; a relative path is resolved
against the STAR file's folder, or else against the working directory (where RELION
resolves it: its project folder). Stacks are opened as memory maps, so a dataset larger
than RAM is read one batch at a time.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from cryosgd.data.particles import ParticleTable
from cryosgd.errors import InputError
from cryosgd.io.mrc import open_mrc


def _resolve(name: str, root: Path) -> Path:
    path = root / name
    return path if path.exists() or Path(name).is_absolute() or not Path(name).exists() else Path(name)


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
        self._maps = [open_mrc(p) for p in self.paths]
        self.box_px = self._validate(source)

    def _validate(self, source: Path) -> int:
        shapes = {}
        for path, mrc in zip(self.paths, self._maps):
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

    def subset(self, index: np.ndarray) -> ImageStack:
        """The images of particles ``index``, in that order (for ``ParticleTable.subset``)."""
        view = copy.copy(self)
        view.stack_id, view.slot = self.stack_id[index], self.slot[index]
        return view

    def read(self, index: np.ndarray) -> np.ndarray:
        """Images of particles ``index`` → ``(B, box, box)`` float32, [y, x]."""
        index = np.asarray(index)
        out = np.empty((len(index), self.box_px, self.box_px), dtype=np.float32)
        for k in np.unique(self.stack_id[index]):
            rows = np.nonzero(self.stack_id[index] == k)[0]
            data = self._maps[k].data
            data = data if data.ndim == 3 else data[None]
            out[rows] = data[self.slot[index[rows]]]
            bad = ~np.isfinite(out[rows]).all(axis=(1, 2))
            if bad.any():
                first = self.slot[index[rows[bad.argmax()]]] + 1
                raise InputError(self.paths[k], f"image {first}: NaN or infinite pixel values")
        return out

    def close(self) -> None:
        for mrc in self._maps:
            mrc.close()
