"""One half-set on this process: its particles, their images, the forward model, and passes.

Every process holds the poses and CTFs of all the half's particles and the images of its
shard (:mod:`cryosgd.dist`: particle j of the half on rank j mod world size). Batches are drawn
from the whole half in an order fixed by (seed, half, epoch), so they hold the same particles
whatever the number of processes; each process works on its share, and the sums of all shares
meet in :func:`cryosgd.dist.all_reduce_sums`, called here and nowhere else in the engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from cryosgd import dist
from cryosgd.data.batch import Batch, batch_indices, make_batch
from cryosgd.data.particles import ParticleTable
from cryosgd.data.stack import ImageStack
from cryosgd.data.store import ParticleStore
from cryosgd.fourier.grids import FourierGrid
from cryosgd.model.forward import ForwardModel
from cryosgd.objective.loss import count
from cryosgd.objective.noise import noise_weight
from cryosgd.pose.scores import band_mask
from cryosgd.recon.settings import ReconstructionSettings


class HalfSet:
    """The particles of one half-set and the model on the working grid.

    ``stack`` may be None (no images: poses and CTFs suffice for H, as in ``cryosgd hessian``).
    """

    def __init__(self, table: ParticleTable, stack: ImageStack | None, grid: FourierGrid,
                 settings: ReconstructionSettings, half: int, device=None, dtype=torch.float32):
        self.table, self.grid, self.settings, self.half = table, grid, settings, half
        self.disc_grid = grid  # the images' disc (``grid`` is narrower on a half `within` a band)
        self.device, self.dtype = torch.device("cpu") if device is None else torch.device(device), dtype
        self.model = ForwardModel(grid, settings.interp, use_ctf=table.has_ctf and settings.use_ctf)
        self.owned = dist.shard(np.arange(len(table)))  # positions in the half this rank holds
        self.store = None
        self._band = None  # which of the store's disc values the grid keeps (see `within`)
        if stack is not None:
            store_dtype = torch.bfloat16 if settings.store_dtype == "bfloat16" else torch.complex64
            self.store = ParticleStore(stack.subset(self.owned), grid, settings.store, store_dtype, self.device, dtype)

    def __len__(self) -> int:
        return len(self.table)

    def within(self, radius_px: float) -> HalfSet:
        """The same half (particles, images, map shape) on the image frequencies within
        ``radius_px`` only: its passes cost in proportion to the band's area, and leave the
        voxels beyond it untouched."""
        if radius_px >= self.grid.radius_px:
            return self
        band = copy.copy(self)
        band.grid = replace(self.grid, radius_px=float(radius_px))
        band.model = replace(self.model, grid=band.grid)
        band._band = band_mask(self.disc_grid.freq_px, radius_px).to(self.device)
        return band

    def noise_weight(self, sigma2: Tensor | None) -> Tensor | None:
        """``(G, P)`` weights 1/σ² on this half's frequencies (None for white noise), scaled as
        on the whole disc: a half `within` a band weighs its frequencies as the whole half does."""
        if sigma2 is None:
            return None
        weight = noise_weight(sigma2, self.disc_grid)
        return weight if self._band is None else weight[:, self._band.to(weight.device)]

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in an epoch: one for the full-batch methods, else one per batch."""
        return 1 if self.settings.full_batch else -(-len(self) // self.settings.batch_size)

    def parts(self, epoch: int | None) -> Iterator[Batch]:
        """This rank's share of each batch, in the order of ``epoch`` (shuffled) or in file order
        (``epoch=None``); images are prepared one batch ahead. An empty share is one particle
        with weight 0, so that every rank computes sums of the same shapes for every batch."""
        rng = None if epoch is None else np.random.default_rng([self.settings.seed, self.half, epoch])
        world, rank = dist.world_size(), dist.rank()
        shares = [index[index % world == rank] for index in batch_indices(len(self), self.settings.batch_size, rng)]
        if self.store is None:
            for index in shares:
                yield self._batch(index)
            return
        for index, images in self.store.batches([index // world for index in shares]):
            yield self._batch(index * world + rank, images)

    def _batch(self, index: np.ndarray, images: Tensor | None = None) -> Batch:
        if len(index) == 0:
            return self._empty_share()
        batch = make_batch(self.table, index, None, self.dtype, self.device)
        if images is None:
            return batch
        return replace(batch, images_ft=images if self._band is None else images[:, self._band])

    def _empty_share(self) -> Batch:
        batch = make_batch(self.table, np.arange(1), None, self.dtype, self.device)
        images = torch.zeros(1, len(self.grid.freq_px), dtype=torch.promote_types(self.dtype, torch.complex64),
                             device=self.device)
        return replace(batch, images_ft=images, weight=torch.zeros(1, dtype=self.dtype, device=self.device))

    def pass_mean(self, fn: Callable[[Batch], tuple], on_batch: Callable[[], None] = lambda: None) -> list[Tensor]:
        """Means over all the half's images of sums ``fn(batch)`` (a tuple of tensors or numbers),
        in one pass and one all-reduce."""
        totals, images = None, 0.0
        for batch in self.parts(None):
            values = fn(batch)
            totals = list(values) if totals is None else [t + v for t, v in zip(totals, values)]
            images += count(batch)
            on_batch()
        *reduced, total = dist.all_reduce_sums(*totals, images)
        return [r / float(total) for r in reduced]

    def zeros(self) -> Tensor:
        complex_dtype = torch.promote_types(self.dtype, torch.complex64)
        return torch.zeros(self.grid.volume_shape, dtype=complex_dtype, device=self.device)
