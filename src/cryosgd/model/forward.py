"""The image-formation model in Fourier space and its exact adjoint.

For particle i and image frequency k of the working disc:

    ŷ_i(k) = CTF_i(k) · exp(+2πi k · origin_i) · V(A_iᵀ (kx, ky, 0))

``forward`` is S = C · T · P (CTF, shift phase, slice), ``adjoint`` is S* = Pᵀ · T* · C,
exact for the real inner product on both sides (see :mod:`cryosgd.fourier.slice`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryosgd.conventions import shift_phase
from cryosgd.data.batch import Batch
from cryosgd.fourier.grids import FourierGrid
from cryosgd.fourier.slice import Interp, extract, insert


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
        """``(B, P)`` complex factor CTF · phase applied after slicing (cached on the batch).

        Evaluated in float64 (phases and CTF arguments reach hundreds of radians), then cast.
        """
        key = ("modulation", self.grid, self.use_ctf, dtype)
        if key not in batch.cache:
            freq_invA = self.grid.freq_invA().to(device=batch.shift_A.device)
            factor = shift_phase(freq_invA, batch.shift_A.to(torch.float64))
            if self.use_ctf and batch.ctf is not None:
                factor = factor * batch.ctf.to(dtype=torch.float64)(freq_invA)
            batch.cache[key] = factor.to(torch.promote_types(dtype, torch.complex64))
        return batch.cache[key]

    def _freq_px(self, like: Tensor) -> Tensor:
        return self.pad * self.grid.freq_px.to(device=like.device, dtype=like.real.dtype)

    def forward(self, volume_ft: Tensor, batch: Batch) -> Tensor:
        """``(n, n, n // 2 + 1)`` map → ``(B, P)`` predicted image disc values."""
        real = volume_ft.real.dtype
        slices = extract(volume_ft, batch.rotations.to(real), self._freq_px(volume_ft), self.interp)
        return slices * self.modulation(batch, real)

    def adjoint(self, values: Tensor, batch: Batch) -> Tensor:
        """``(B, P)`` image disc values → ``(n, n, n // 2 + 1)`` back-projected map."""
        real = values.real.dtype
        weighted = values * self.modulation(batch, real).conj()
        return insert(weighted, batch.rotations.to(real), self._freq_px(values), self.volume_shape,
                      self.interp)
