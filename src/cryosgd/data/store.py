"""ParticleStore: every image of a particle set, FFT'd and Fourier-cropped once.

An image is read from its stack, transformed (``conventions.images_to_ft``) and cropped to
the working grid's half-disc of P frequencies (``grid.take``). In memory (``mode="memory"``)
these values are kept, as complex64 or, with ``dtype=torch.bfloat16``, as bfloat16 pairs
(half the memory; 3 significant digits, far below the noise of a particle image, and no
overflow: the unnormalised FFT of a noisy image exceeds float16's range). The first pass over
the data fills the store; later passes only gather. When the values would not fit
(``mode="auto"`` keeps them in memory when they take less than half of the available memory:
the GPU's free memory when the store is on CUDA, where the values are allocated at once),
``mode="disk"`` reads and transforms every batch again, the next batch in a background thread
while the current one is being used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from cryosgd.conventions import images_to_ft
from cryosgd.data.stack import ImageStack
from cryosgd.errors import InputError
from cryosgd.resources import available_memory_bytes

MODES = ("auto", "memory", "disk")


class ParticleStore:
    """The ``(N, P)`` disc values of the images of ``stack``, on ``device``.

    Args:
        stack: the images (its ``subset`` fixes which particles and their order).
        grid: the working :class:`~cryosgd.fourier.grids.FourierGrid` (its ``take`` crops,
            ``freq_px`` counts the P frequencies).
        mode: ``"memory"``, ``"disk"`` or ``"auto"`` (see the module docstring).
        dtype: ``torch.complex64`` or ``torch.bfloat16`` for values kept in memory.
    """

    def __init__(self, stack: ImageStack, grid, mode: str = "auto", dtype: torch.dtype = torch.complex64,
                 device=None, compute_dtype: torch.dtype = torch.float32):
        if mode not in MODES:
            raise InputError(None, f"--store {mode}: expected one of {', '.join(MODES)}")
        if dtype not in (torch.complex64, torch.bfloat16):
            raise InputError(None, f"--store-dtype {dtype}: expected complex64 or bfloat16")
        self.stack, self.grid, self.device, self.compute_dtype = stack, grid, device, compute_dtype
        n, points = len(stack), len(grid.freq_px)
        self.nbytes = n * points * (8 if dtype == torch.complex64 else 4)
        self.resident = mode == "memory" or (mode == "auto" and self.nbytes < available_memory_bytes(device) / 2)
        self._values = None
        if self.resident:
            shape = (n, points) if dtype == torch.complex64 else (n, points, 2)
            self._values = torch.empty(shape, dtype=dtype, device=device)
            self._loaded = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.stack)

    def images(self, index: np.ndarray) -> Tensor:
        """``(B, P)`` complex disc values of particles ``index`` (read and kept on first use)."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) == 0:
            return torch.zeros(0, len(self.grid.freq_px), dtype=torch.promote_types(self.compute_dtype, torch.complex64),
                               device=self.device)
        if not self.resident:
            return self._transform(index)
        missing = index[~self._loaded[index]]
        if len(missing):
            self._keep(missing, self._transform(missing))
        return self._unpack(self._values[torch.as_tensor(index, device=self._values.device)])

    def batches(self, batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, Tensor]]:
        """``(index, images)`` for each index array, the next one prepared in the background."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for index in batches:
                upcoming = pool.submit(self.images, index)
                if pending is not None:
                    yield pending[0], pending[1].result()
                pending = (index, upcoming)
            if pending is not None:
                yield pending[0], pending[1].result()

    def _transform(self, index: np.ndarray) -> Tensor:
        images = torch.as_tensor(self.stack.read(index), device=self.device).to(self.compute_dtype)
        return self.grid.take(images_to_ft(images))

    def _keep(self, index: np.ndarray, values: Tensor) -> None:
        rows = torch.as_tensor(index, device=self._values.device)
        if self._values.dtype == torch.bfloat16:
            values = torch.view_as_real(values.to(torch.complex64))
        self._values[rows] = values.to(self._values.dtype)
        self._loaded[index] = True

    def _unpack(self, values: Tensor) -> Tensor:
        if values.dtype == torch.bfloat16:
            values = torch.view_as_complex(values.float())
        return values.to(torch.promote_types(self.compute_dtype, torch.complex64))
