"""The weighted least-squares objective of a batch and its derivatives.

For a batch B of images, on the rfft half-grid map ``x`` and the half-disc pixels k:

    f_B(x) = (1/|B|) Σ_i ½ Σ_k m(k) w_i(k) |(S_i x)(k) − y_i(k)|²  +  ½ Σ_v λ_v m₃(v) |x_v|²

``m(k)`` (1 at kx = 0, else 2) and ``m₃(v)`` (likewise for voxels) make both sums equal to
sums over the full Fourier plane and cube, so f is the paper's loss (PAPER.md §2.2) for a
real map; ``w_i = ρ_i/σ_g²(k)`` weights the noise of image i's optics group g (σ = 1
reproduces the paper) and the row weight ρ_i (1, or a pose's posterior probability when rows
are (image, pose) pairs, then |B| = Σ ρ_i). The loss is quadratic for fixed poses, so the
Hessian H does not depend on x and H·z is the gradient of the data-free loss at z.
Gradients are for the real inner product, i.e. ∂f/∂Re x + i ∂f/∂Im x (torch's convention).

The ``data_*`` methods return sums over the batch's images of the data term alone: a caller
that splits a batch across processes adds the sums of all parts (one all-reduce), then divides
by the total count and adds the ridge (:meth:`LeastSquares.ridge_gradient`). The batch means
(``loss``, ``loss_and_gradient``, ``hvp``) do that for a batch held whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryosgd.data.batch import Batch, WeightedRows
from cryosgd.fourier.grids import voxel_multiplicity
from cryosgd.model.forward import ForwardModel


def count(batch: Batch) -> float:
    """|B|: the number of images, or the sum of the row weights."""
    return float(len(batch)) if batch.weight is None else float(batch.weight.sum())


def _squared(v: Tensor) -> Tensor:
    return v.real.square() + v.imag.square()


@dataclass(frozen=True)
class DataTerms:
    """What a batch contributes to the normal equations (sums over its images): ``c`` = data
    part of f(0) times |B|, ``b`` = S*(w y), and the data parts of diag(H) (None where it was not
    asked for) and of H·1 (row sums: the data density RELION divides by), so that
    f(x) = (c − ⟨b, x⟩ + ½⟨x, Hx⟩)/|B| + ridge."""

    c: Tensor
    b: Tensor
    diagonal: Tensor | None
    density: Tensor


@dataclass(frozen=True)
class Gradients:
    """Sums over a batch (data term only): the loss, its gradient, and optionally H·z and diag(H)
    (or H·1)."""

    loss: Tensor
    gradient: Tensor
    hz: Tensor | None = None
    diagonal: Tensor | None = None


@dataclass(frozen=True)
class LeastSquares:
    """f_B, ∇f_B, H_B·z and the data terms for a :class:`ForwardModel`.

    Attributes:
        model: the forward model (grid, interpolation, CTF on/off).
        ridge: λ (1e-8 in the paper): a number, or a tensor of the map's half-grid shape for a
            per-voxel ridge (the Wiener prior).
        noise_weight: ``(G, P)`` w_g(k) = 1/σ_g²(k) on the disc for each optics group g
            (:mod:`cryosgd.objective.noise`), or None for white unit noise.
    """

    model: ForwardModel
    ridge: float | Tensor = 1e-8
    noise_weight: Tensor | None = None

    def pixel_weight(self, batch: Batch, like: Tensor) -> Tensor:
        """m(k) w_i(k) of every image pixel: ``(P,)`` for white noise and unit rows, else ``(B, P)``."""
        weight = self.model.grid.multiplicity.to(device=like.device, dtype=like.real.dtype)
        if self.noise_weight is not None:
            weight = weight * self.noise_weight.to(weight)[batch.groups(weight.device)]
        if batch.weight is not None:
            weight = weight * batch.weight.to(weight)[:, None]
        return weight

    def ridge_diagonal(self, shape: tuple[int, int, int], device=None, dtype=torch.float32) -> Tensor:
        """λ m₃: the ridge's contribution to diag(H), per voxel."""
        return self.ridge * voxel_multiplicity(shape, device, dtype)

    def ridge_gradient(self, x: Tensor) -> Tensor:
        return self.ridge_diagonal(x.shape[-3:], x.device, x.real.dtype) * x

    def ridge_loss(self, x: Tensor) -> Tensor:
        return 0.5 * (self.ridge_diagonal(x.shape, x.device, x.real.dtype) * _squared(x)).sum()

    def residual(self, x: Tensor, batch: Batch) -> Tensor:
        """``(B, P)`` predicted minus observed disc values."""
        return self.model.forward(x, batch) - batch.images_ft

    def data_loss(self, x: Tensor, batch: Batch, residual: Tensor | None = None) -> Tensor:
        """Σ_i ½ Σ_k m w |S_i x − y_i|², accumulated in float64 (it is compared across steps)."""
        r = self.residual(x, batch) if residual is None else residual
        return 0.5 * (self.pixel_weight(batch, r) * _squared(r)).double().sum()

    def data_gradients(self, x: Tensor, batch: Batch, z: Tensor | None = None, diagonal: int | None = None
                       ) -> Gradients:
        """The data loss and its gradient S*(w r); when ``z`` is given the data part of H·z, and
        with ``diagonal`` = 2 that of diag(H) (= 1: of H·1, the row sums): sums over the batch, in
        one scatter."""
        r = self.residual(x, batch)
        weight = self.pixel_weight(batch, r)
        values = [weight * r] if z is None else [weight * r, weight * self.model.forward(z, batch)]
        curvature = None if diagonal is None else weight.expand(r.shape)
        maps, squared = self.model.back_project(batch, torch.stack(values), curvature, powers=(diagonal or 2,))
        return Gradients(self.data_loss(x, batch, r), maps[0], None if z is None else maps[1],
                         None if squared is None else squared[0])

    def data_hvp(self, z: Tensor, batch: Batch) -> Tensor:
        """Σ_i S_i*(w S_i z_j) for a stack ``z (K, n, n, nh)``, with one scatter."""
        predicted = torch.stack([self.model.forward(v, batch) for v in z])
        maps, _ = self.model.back_project(batch, self.pixel_weight(batch, predicted) * predicted)
        return maps

    def data_curvature(self, p: Tensor, batch: Batch) -> Tensor:
        """Σ_i Σ_k m w |S_i p|² = the data part of ⟨p, H p⟩ times |B| (one forward, no scatter)."""
        predicted = self.model.forward(p, batch)
        return (self.pixel_weight(batch, predicted) * _squared(predicted)).double().sum()

    def data_terms(self, rows: Batch | WeightedRows, diagonal: bool = True) -> DataTerms:
        """:class:`DataTerms` of a batch, or of weighted rows (their sums are linear in the rows:
        each image's share is made once, and scattered once per row), in one scatter; without
        ``diagonal``, diag(H) is not made (a quarter of the scatter's work)."""
        rows = rows if isinstance(rows, WeightedRows) else WeightedRows.of(rows)
        y = rows.images.images_ft
        weight = self.pixel_weight(rows.images, y)
        powers = (1, 2) if diagonal else (1,)
        maps, curvature = self.model.back_project(rows, (weight * y)[None], weight.expand(y.shape), powers=powers)
        per_image = 0.5 * (weight * _squared(y)).double().sum(1)
        c = (rows.weight.double() * per_image[rows.image]).sum()
        return DataTerms(c, maps[0], curvature[1] if diagonal else None, curvature[0])

    def loss(self, x: Tensor, batch: Batch) -> Tensor:
        """f_B(x) for a batch held whole."""
        return self.data_loss(x, batch) / count(batch) + self.ridge_loss(x)

    def loss_and_gradient(self, x: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        sums = self.data_gradients(x, batch)
        loss, gradient = sums.loss, sums.gradient
        return loss / count(batch) + self.ridge_loss(x), gradient / count(batch) + self.ridge_gradient(x)

    def hvp(self, z: Tensor, batch: Batch) -> Tensor:
        """H_B · z (a single map, or a stack ``(K, n, n, nh)``) for a batch held whole."""
        stack = z if z.dim() == 4 else z[None]
        out = self.data_hvp(stack, batch) / count(batch) + self.ridge_gradient(stack)
        return out if z.dim() == 4 else out[0]
