"""The image-formation model in Fourier space and its exact adjoint.

For particle i and image frequency k of the working disc:

    ŷ_i(k) = CTF_i(k) · exp(+2πi k · origin_i) · V(A_iᵀ (kx, ky, 0))

``forward`` is S = C · T · P (CTF, shift phase, slice), ``adjoint`` is S* = Pᵀ · T* · C,
exact for the real inner product on both sides (see :mod:`cryosgd.fourier.slice`).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import Tensor

from cryosgd.data.batch import Batch, WeightedRows
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import Interp, extract, insert_many
from cryosgd.model.ctf import ctf_values


def _phase(freq_px: Tensor, step_invA: float, shift_A: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, P)`` complex exp(+2πi k · origin) of complex ``dtype``.

    The factor separates, exp(2πi (kx tx + ky ty)) = exp(2πi kx tx) · exp(2πi ky ty): a table per
    particle and frequency index on each axis, its angles in float64 (they reach hundreds of
    radians), and one product per (particle, pixel) in ``dtype`` instead of a sine and a cosine
    (``conventions.shift_phase``'s values, to rounding).
    """
    index = freq_px.long()
    steps = torch.arange(-int(index.abs().max()), int(index.abs().max()) + 1, device=shift_A.device)
    tables = [torch.polar(torch.ones_like(a), a).to(dtype) for a in
              (2 * math.pi * step_invA * shift_A[:, axis, None].double() * steps for axis in (0, 1))]
    offset = steps.shape[0] // 2
    return tables[0][:, index[:, 0] + offset] * tables[1][:, index[:, 1] + offset]


@dataclass(frozen=True)
class ForwardModel:
    """Slice · shift · CTF on a :class:`FourierGrid`, with ``trilinear`` or ``nearest`` slicing.

    ``pad`` > 1 slices a map oversampled ``pad`` times in Fourier space (a real-space map
    zero-padded to ``pad · n``), whose half-grid has shape ``volume_shape``.
    """

    grid: FourierGrid
    interp: Interp = "trilinear"
    use_ctf: bool = True
    pad: int = 1

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        m = self.pad * self.grid.work_box_px
        return (m, m, m // 2 + 1)

    def modulation(self, batch: Batch, dtype) -> Tensor:
        """``(B, P)`` complex factor CTF · phase applied after slicing, cached on the (immutable) batch.

        The phase angles and the CTF are evaluated in float64 (their arguments reach hundreds of
        radians), the product in the working precision.
        """
        sources = (batch.shift_A, *(batch.ctf.columns() if self.use_ctf and batch.ctf is not None else ()))
        return batch.derived(("modulation", self.grid, dtype), sources, lambda: self._modulation(batch, dtype))

    def _modulation(self, batch: Batch, dtype) -> Tensor:
        freq_px = self.grid.freq_px.to(device=batch.shift_A.device)
        factor = _phase(freq_px, self.grid.freq_step_invA, batch.shift_A, torch.promote_types(dtype, torch.complex64))
        if self.use_ctf and batch.ctf is not None:
            factor = factor * self._ctf(batch, factor.real.dtype)
        return factor

    def _ctf(self, batch: Batch, dtype: torch.dtype) -> Tensor:
        """``(B, P)`` CTF values evaluated in float64 and kept in ``dtype``, cached; the rows of a
        :meth:`Batch.take` are gathered from their source batch's (one evaluation per image,
        however many poses it has), unless their own CTF parameters were edited in place since."""
        if batch.source is not None and batch.source.gathers_ctf_of(batch):
            return self._ctf(batch.source.parent, dtype)[batch.source.rows]

        def evaluate() -> Tensor:
            freq_invA = self.grid.freq_invA().to(device=batch.ctf.defocus_u_A.device)
            return ctf_values(batch.ctf.to(dtype=torch.float64), freq_invA).to(dtype)

        return batch.derived(("ctf", self.grid, dtype), batch.ctf.columns(), evaluate)

    def _freq_px(self, like: Tensor) -> Tensor:
        return self.pad * self.grid.freq_px.to(device=like.device, dtype=like.real.dtype)

    def forward(self, volume_ft: Tensor, batch: Batch) -> Tensor:
        """``(n, n, n // 2 + 1)`` map → ``(B, P)`` predicted image disc values."""
        real = volume_ft.real.dtype
        slices = extract(volume_ft, batch.rotations.to(real), self._freq_px(volume_ft), self.interp)
        return slices * self.modulation(batch, real)

    def adjoint(self, values: Tensor, batch: Batch) -> Tensor:
        """``(B, P)`` image disc values → ``(n, n, n // 2 + 1)`` back-projected map."""
        maps, _ = self.back_project(batch, values[None])
        return maps[0]

    def back_project(self, rows: Batch | WeightedRows, values: Tensor | None = None, curvature: Tensor | None = None,
                     powers: tuple[int, ...] = (2,)) -> tuple[Tensor | None, Tensor | None]:
        """Several adjoints in one scatter.

        ``values (K, B, P)`` complex → ``(K, n, n, nh)`` maps S* values; ``curvature (B, P)``
        real → ``(len(powers), n, n, nh)`` real maps Σ_i Σ_k P_i(k, v)^p CTF_i(k)² curvature_i(k):
        for p = 2 the data term of the Hessian diagonal, for p = 1 that of H·1 (its row sums).
        Either may be None. For a :class:`Batch` of B images, each at its pose; for
        :class:`WeightedRows`, the B images of ``rows.images``, each row back-projecting its
        image's values at its rotation times its weight.
        """
        like = values if values is not None else curvature
        real = like.real.dtype
        images, source, scale = (rows, None, None) if isinstance(rows, Batch) else (rows.images, rows.image,
                                                                                    rows.weight)
        modulation = self.modulation(images, real)
        weighted = None if values is None else values * modulation.conj()
        squared = None if curvature is None else curvature * modulation.abs().square()
        return insert_many(weighted, squared, rows.rotations.to(real), self._freq_px(like), self.volume_shape,
                           self.interp, powers, source, scale)
