"""Batch: what the forward model needs about a set of particles, as tensors on one device.

A Batch is immutable: new poses make a new Batch (:meth:`Batch.with_poses`, or
``dataclasses.replace``), and a value derived from its fields (the CTF · phase factor of the
forward model) is cached on that Batch only, under a key that names the tensors it was
computed from and their versions, so that it can never outlive them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

from cryosgd.conventions import euler_to_matrix
from cryosgd.data.particles import ParticleTable


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters, each a ``(B,)`` tensor (RELION's units: Å, degrees, kV, mm)."""

    defocus_u_A: Tensor
    defocus_v_A: Tensor
    defocus_angle_deg: Tensor
    voltage_kV: Tensor
    cs_mm: Tensor
    amplitude_contrast: Tensor
    phase_shift_deg: Tensor
    bfactor_A2: Tensor
    scale: Tensor

    @classmethod
    def from_table(cls, table: ParticleTable, index: np.ndarray | None = None,
                   dtype: torch.dtype = torch.float64, device=None) -> CTFParams:
        """The CTF parameters of ``table`` (optics joined per particle), optionally a subset."""
        columns = {
            "defocus_u_A": table.defocus_u_A, "defocus_v_A": table.defocus_v_A,
            "defocus_angle_deg": table.defocus_angle_deg, "voltage_kV": table.per_particle("voltage_kV"),
            "cs_mm": table.per_particle("cs_mm"), "amplitude_contrast": table.per_particle("amplitude_contrast"),
            "phase_shift_deg": table.phase_shift_deg, "bfactor_A2": table.bfactor_A2, "scale": table.ctf_scale,
        }
        pick = slice(None) if index is None else index
        return cls(**{k: torch.as_tensor(np.asarray(v)[pick], dtype=dtype, device=device)
                      for k, v in columns.items()})

    def to(self, dtype: torch.dtype | None = None, device=None) -> CTFParams:
        return CTFParams(*(c.to(device=device, dtype=dtype) for c in self.columns()))

    def columns(self) -> tuple[Tensor, ...]:
        """The ``(B,)`` parameters in field order."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def take(self, rows: Tensor) -> CTFParams:
        """The parameters of rows ``rows`` (indices, repeats allowed)."""
        return CTFParams(*(c[rows] for c in self.columns()))


@dataclass(frozen=True, eq=False)
class Batch:
    """Particles ``index`` of a table: rotations, shifts, CTF and (optionally) images.

    Fields:
        index: ``(B,)`` particle indices into the table.
        rotations: ``(B, 3, 3)`` RELION rotation matrices.
        shift_A: ``(B, 2)`` origins (rlnOriginXAngst, rlnOriginYAngst).
        ctf: CTF parameters, or None for CTF-free data.
        images_ft: ``(B, P)`` complex disc values of the images' rfft2 (grid order), or None.
        optics_group: ``(B,)`` 0-based optics-group index (selects the noise spectrum), or None
            for a single group.
        weight: ``(B,)`` weight of each row in the objective (a pose's posterior probability
            when rows are (image, pose) pairs), or None for 1.
        source: how this batch was taken from another (:class:`Taken`), or None: what depends
            only on the particles (their CTF values) is then computed once on that batch and gathered.
    """

    index: np.ndarray
    rotations: Tensor
    shift_A: Tensor
    ctf: CTFParams | None
    images_ft: Tensor | None = None
    optics_group: Tensor | None = None
    weight: Tensor | None = None
    source: Taken | None = field(default=None, repr=False)
    _derived: dict = field(default_factory=dict, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.index)

    def groups(self, device=None) -> Tensor:
        """``(B,)`` optics-group index of every image (all 0 when the batch has none)."""
        if self.optics_group is None:
            return torch.zeros(len(self), dtype=torch.long, device=device)
        return self.optics_group.to(device)

    def with_poses(self, rotations: Tensor, shift_A: Tensor) -> Batch:
        """The same particles at new poses: a new Batch, with nothing derived carried over."""
        return replace(self, rotations=rotations, shift_A=shift_A)

    def take(self, rows: Tensor) -> Batch:
        """The rows ``rows`` (indices into this batch, repeats allowed): e.g. one row per
        (image, candidate pose), to be given their poses and weights."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        ctf = None if self.ctf is None else self.ctf.take(rows)
        return Batch(self.index[rows.cpu().numpy()], self.rotations[rows], self.shift_A[rows], ctf,
                     pick(self.images_ft), pick(self.optics_group), pick(self.weight), Taken(self, rows, ctf))

    def derived(self, key: tuple, sources: tuple[Tensor, ...], compute):
        """``compute()``, cached under ``key`` and the identity and version of ``sources``
        (one value per ``key``: a new version replaces the old).

        A tensor's version counts its in-place changes, so even a batch whose tensors were
        modified in place (which callers should not do) never returns a stale value.
        """
        stamp = tuple((id(t), t._version) for t in sources)
        cached = self._derived.get(key)
        if cached is None or cached[0] != stamp:
            self._derived[key] = (stamp, compute())
        return self._derived[key][1]


@dataclass(frozen=True, eq=False)
class WeightedRows:
    """Weighted rows over a batch of images at their origins: row r is image ``image[r]`` of
    ``images`` at rotation ``rotations[r]``, with weight ``weight[r]`` (a pose's posterior
    probability, shared among its symmetry mates).

    The rows of one image (its poses at one origin and their symmetry mates) share its data,
    CTF and origin: a sum that is linear in the rows weighs those once per image and
    back-projects once per row.

    Fields: ``images`` (S images; their rotations and weights are not used), ``image (R,)``
    long, ``rotations (R, 3, 3)``, ``weight (R,)``.
    """

    images: Batch
    image: Tensor
    rotations: Tensor
    weight: Tensor

    def __len__(self) -> int:
        return len(self.image)

    @classmethod
    def of(cls, batch: Batch) -> WeightedRows:
        """Every image of ``batch`` as one row, at its pose, with its weight (1 without)."""
        device, dtype = batch.rotations.device, batch.rotations.dtype
        weight = torch.ones(len(batch), dtype=dtype, device=device) if batch.weight is None else batch.weight
        return cls(replace(batch, weight=None), torch.arange(len(batch), device=device), batch.rotations, weight)

    def batch(self) -> Batch:
        """The rows as a :class:`Batch`, an image per row (for what works per row: slicing)."""
        return replace(self.images.take(self.image), rotations=self.rotations, weight=self.weight)


@dataclass(frozen=True, eq=False)
class Taken:
    """``parent.take(rows)``, with the rows' CTF parameters as taken and the versions of the
    parent's then (see :meth:`Batch.derived` on versions)."""

    parent: Batch
    rows: Tensor
    ctf: CTFParams | None
    parent_versions: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "parent_versions", _versions(self.parent.ctf))

    def gathers_ctf_of(self, batch: Batch) -> bool:
        """Whether the parent's CTF values, gathered by ``rows``, are ``batch``'s: its parameters
        are those taken, and neither they nor the parent's were edited in place since."""
        return (batch.ctf is not None and batch.ctf is self.ctf and all(v == 0 for v in _versions(batch.ctf))
                and _versions(self.parent.ctf) == self.parent_versions)


def _versions(ctf: CTFParams | None) -> tuple[int, ...]:
    return () if ctf is None else tuple(c._version for c in ctf.columns())


def make_batch(table: ParticleTable, index: np.ndarray, store=None, dtype: torch.dtype = torch.float32,
               device=None) -> Batch:
    """Gather poses, shifts, CTF and, when a :class:`~cryosgd.data.store.ParticleStore` is given,
    its FFT'd, Fourier-cropped images of the particles ``index``. A table without poses gives
    identity rotations (placeholders for a pose search; known-pose commands require poses)."""
    index = np.asarray(index)
    angles = np.zeros((len(table), 3)) if table.angles_deg is None else table.angles_deg
    rotations = euler_to_matrix(torch.as_tensor(angles[index], dtype=torch.float64))
    ctf = CTFParams.from_table(table, index, dtype=dtype, device=device) if table.has_ctf else None
    images_ft = None if store is None else store.images(index).to(device)
    return Batch(index, rotations.to(device=device, dtype=dtype),
                 torch.as_tensor(table.shift_A[index], dtype=dtype, device=device), ctf, images_ft,
                 torch.as_tensor(table.optics_group[index], device=device))


def batch_indices(n: int, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Split ``range(n)`` into consecutive batches, shuffled first when ``rng`` is given."""
    order = np.arange(n) if rng is None else rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
