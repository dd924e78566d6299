"""The weighted least-squares objective of a batch and its derivatives.

For a batch B of images, on the rfft half-grid map ``x`` and the half-disc pixels k:

    f_B(x) = (1/|B|) Σ_i ½ Σ_k m(k) w(k) |(S_i x)(k) − y_i(k)|²  +  ½ λ Σ_v m₃(v) |x_v|²

``m(k)`` (1 at kx = 0, else 2) and ``m₃(v)`` (likewise for voxels) make both sums equal to
sums over the full Fourier plane and cube, so f is the paper's loss (PAPER.md §2.2) for a
real map; ``w = 1/σ²(k)`` weights the noise, per optics group (σ = 1 reproduces the paper). The loss is
quadratic for fixed poses, so the Hessian H does not depend on x and
H·z = ∇f_B(z) − ∇f_B(0) is the gradient of the data-free loss at z.
Gradients are for the real inner product, i.e. ∂f/∂Re x + i ∂f/∂Im x (torch's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryosgd.data.batch import Batch
from cryosgd.model.forward import ForwardModel


def voxel_multiplicity(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> Tensor:
    """``m₃``: how many voxels of the full cube each half-grid voxel stands for.

    1 on the planes kx = 0 and kx = n/2 (Nyquist; boxes are even), 2 elsewhere.
    """
    m = torch.full(shape, 2.0, device=device, dtype=dtype)
    m[..., 0] = 1.0
    m[..., -1] = 1.0
    return m


@dataclass
class LeastSquares:
    """f_B, ∇f_B and H_B·z for a :class:`ForwardModel`.

    Attributes:
        model: the forward model (grid, interpolation, CTF on/off).
        l2: the ridge weight λ (1e-8 in the paper): a number, or a tensor of the map's
            half-grid shape for a per-voxel ridge.
        noise_weight: ``(G, P)`` w_g(k) = 1/σ_g²(k) on the disc for each optics group g
            (:mod:`cryosgd.objective.noise`), or None for white unit noise.
    """

    model: ForwardModel
    l2: float | Tensor = 1e-8
    noise_weight: Tensor | None = None

    def pixel_weight(self, batch: Batch, like: Tensor) -> Tensor:
        """m(k) w(k) of every image pixel: ``(P,)`` for white noise, else ``(B, P)``."""
        weight = self.model.grid.multiplicity.to(device=like.device, dtype=like.real.dtype)
        if self.noise_weight is None:
            return weight
        return weight * self.noise_weight.to(weight)[batch.groups(weight.device)]

    def ridge(self, shape: tuple[int, int, int], device=None, dtype=torch.float32) -> Tensor:
        """λ m₃: the ridge's contribution to diag(H), per voxel."""
        return self.l2 * voxel_multiplicity(shape, device, dtype)

    def _ridge(self, x: Tensor) -> Tensor:
        return self.ridge(x.shape, x.device, x.real.dtype)

    def residual(self, x: Tensor, batch: Batch) -> Tensor:
        """``(B, P)`` predicted minus observed disc values."""
        return self.model.forward(x, batch) - batch.images_ft

    def loss(self, x: Tensor, batch: Batch, residual: Tensor | None = None) -> Tensor:
        r = self.residual(x, batch) if residual is None else residual
        data = 0.5 * (self.pixel_weight(batch, r) * (r.real.square() + r.imag.square())).sum()
        ridge = 0.5 * (self._ridge(x) * (x.real.square() + x.imag.square())).sum()
        return data / len(batch) + ridge

    def loss_and_gradient(self, x: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """f_B(x) and ∇f_B(x) through the explicit adjoint (one forward, one back-projection)."""
        loss, gradient, _ = self.loss_gradient_hvp(x, batch)
        return loss, gradient

    def loss_gradient_hvp(self, x: Tensor, batch: Batch, z: Tensor | None = None):
        """f_B(x), ∇f_B(x) and, when ``z`` is given, H_B·z (else None): both back-projections
        share one scatter."""
        r = self.residual(x, batch)
        weight = self.pixel_weight(batch, r)
        values = [weight * r] if z is None else [weight * r, weight * self.model.forward(z, batch)]
        maps, _ = self.model.back_project(batch, torch.stack(values))
        gradient = maps[0] / len(batch) + self._ridge(x) * x
        hz = None if z is None else maps[1] / len(batch) + self._ridge(z) * z
        return self.loss(x, batch, r), gradient, hz

    def hvp(self, z: Tensor, batch: Batch) -> Tensor:
        """H_B · z: the gradient of the data-free loss at z."""
        return self.hvp_many(z[None], batch)[0]

    def hvp_many(self, z: Tensor, batch: Batch) -> Tensor:
        """H_B · z_j for a stack ``z (K, n, n, nh)``, with one scatter."""
        predicted = torch.stack([self.model.forward(v, batch) for v in z])
        maps, _ = self.model.back_project(batch, self.pixel_weight(batch, predicted) * predicted)
        return maps / len(batch) + self._ridge(z[0]) * z

    def data_terms(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What the data contribute to the normal equations, in one scatter.

        Returns ``c = f_B(0)`` without the ridge, ``b = −∇f_B(0) = S*(w y) / |B|`` and the data
        terms of diag(H_B) and of H_B·1 (its row sums: the data density RELION divides by),
        both real, so that f_B(x) = c − ⟨b, x⟩ + ½⟨x, H_B x⟩.
        """
        y = batch.images_ft
        weight = self.pixel_weight(batch, y)
        maps, curvature = self.model.back_project(batch, (weight * y)[None], weight, powers=(2, 1))
        c = 0.5 * (weight * (y.real.square() + y.imag.square())).sum() / len(batch)
        return c, maps[0] / len(batch), curvature[0] / len(batch), curvature[1] / len(batch)
