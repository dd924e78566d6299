"""ParticleTable: poses, shifts (Å), CTF parameters and optics of a particle set.

Reads RELION STAR 3.0 (one block; origins ``rlnOriginX/Y`` in pixels; optics per
particle; pixel size from ``rlnDetectorPixelSize · 1e4 / rlnMagnification``, from
``rlnImagePixelSize`` or given by the caller) and 3.1 (``data_optics`` joined once onto
``data_particles`` through ``rlnOpticsGroup``; ``rlnOriginXAngst/YAngst``). Always writes
STAR 3.1. Columns it does not interpret are carried through unchanged.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cryosgd.errors import InputError
from cryosgd.io.star import StarBlock, read_star, write_star

_CTF_COLUMNS = {  # STAR column → (ParticleTable field, default when absent)
    "rlnDefocusU": ("defocus_u_A", None),
    "rlnDefocusV": ("defocus_v_A", None),
    "rlnDefocusAngle": ("defocus_angle_deg", 0.0),
    "rlnPhaseShift": ("phase_shift_deg", 0.0),
    "rlnCtfBfactor": ("bfactor_A2", 0.0),
    "rlnCtfScalefactor": ("ctf_scale", 1.0),
}
_POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_KNOWN = {"rlnImageName", "rlnOpticsGroup", "rlnRandomSubset", *_CTF_COLUMNS, *_POSE_COLUMNS,
          "rlnOriginX", "rlnOriginY", "rlnOriginXAngst", "rlnOriginYAngst", "rlnVoltage",
          "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnDetectorPixelSize",
          "rlnMagnification", "rlnImagePixelSize", "rlnImageSize"}


@dataclass(frozen=True)
class OpticsGroup:
    """One RELION optics group (the per-group part of the CTF and the sampling)."""

    name: str
    voltage_kV: float
    cs_mm: float
    amplitude_contrast: float
    pixel_A: float
    box_px: int | None = None


@dataclass
class ParticleTable:
    """Per-particle arrays of length N, in cryosgd units (Å, degrees)."""

    optics: list[OpticsGroup]
    optics_group: np.ndarray  # (N,) int, 0-based index into `optics`
    image_name: list[str] | None = None  # RELION "index@stack", index 1-based
    angles_deg: np.ndarray | None = None  # (N, 3) rot, tilt, psi
    shift_A: np.ndarray | None = None  # (N, 2) rlnOriginXAngst, rlnOriginYAngst
    defocus_u_A: np.ndarray | None = None  # (N,); None means "no CTF"
    defocus_v_A: np.ndarray | None = None
    defocus_angle_deg: np.ndarray | None = None
    phase_shift_deg: np.ndarray | None = None
    bfactor_A2: np.ndarray | None = None
    ctf_scale: np.ndarray | None = None
    random_subset: np.ndarray | None = None  # (N,) in {1, 2}
    extra: dict[str, list[str]] = field(default_factory=dict)
    source: Path | None = None  # the STAR file it was read from

    def __len__(self) -> int:
        return len(self.optics_group)

    def __post_init__(self) -> None:
        n = len(self.optics_group)
        if self.shift_A is None:
            self.shift_A = np.zeros((n, 2))

    @property
    def has_ctf(self) -> bool:
        return self.defocus_u_A is not None

    @property
    def pixel_A(self) -> float:
        """The common pixel size (Å); an error if optics groups disagree."""
        sizes = {g.pixel_A for g in self.optics}
        if len(sizes) != 1:
            raise InputError(self.source, f"rlnImagePixelSize: optics groups differ ({sorted(sizes)})")
        return sizes.pop()

    def per_particle(self, attribute: str) -> np.ndarray:
        """An optics-group attribute (e.g. ``voltage_kV``) broadcast to every particle."""
        values = np.array([getattr(g, attribute) for g in self.optics], dtype=float)
        return values[self.optics_group]

    def require_poses(self) -> np.ndarray:
        if self.angles_deg is None:
            raise InputError(self.source, "missing column rlnAngleRot/rlnAngleTilt/rlnAnglePsi (poses)")
        return self.angles_deg

    def digest(self) -> str:
        """SHA-256 of everything cryosgd reads from the table (optics, poses, origins, CTFs,
        half-sets, image names): two tables with the same digest describe the same particles."""
        sha = hashlib.sha256(repr(self.optics).encode())
        for name in _ARRAY_FIELDS:
            value = getattr(self, name)
            sha.update(name.encode() + (b"-" if value is None else np.ascontiguousarray(value, dtype=float).tobytes()))
        sha.update("\n".join(self.image_name or []).encode())
        return sha.hexdigest()

    def subset(self, index: np.ndarray) -> ParticleTable:
        """The particles at ``index`` (integer array), in that order."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        names = None if self.image_name is None else [self.image_name[i] for i in index]
        extra = {k: [v[i] for i in index] for k, v in self.extra.items()}
        arrays = {f: pick(getattr(self, f)) for f in _ARRAY_FIELDS}
        return replace(self, image_name=names, extra=extra, **arrays)


_ARRAY_FIELDS = ("optics_group", "angles_deg", "shift_A", "defocus_u_A", "defocus_v_A",
                 "defocus_angle_deg", "phase_shift_deg", "bfactor_A2", "ctf_scale", "random_subset")


def read_particles(path: str | Path, pixel_A: float | None = None, pixel_source: str = "--pixel-size"
                   ) -> ParticleTable:
    """Read a RELION 3.0 or 3.1 particle STAR file.

    Args:
        path: the STAR file.
        pixel_A: pixel size for STAR 3.0 files that carry none; where the file has its own, they
            must agree (``pixel_source`` names where ``pixel_A`` came from in the error).
    """
    path = Path(path)
    if pixel_A is not None and not (pixel_A > 0 and math.isfinite(pixel_A)):
        raise InputError(None, f"{pixel_source} {pixel_A}: must be positive")
    blocks = read_star(path)
    if "optics" in blocks:
        particles = blocks.get("particles")
        if particles is None or not particles.loop:
            raise InputError(path, "STAR 3.1 file has data_optics but no data_particles loop")
        table = _from_star31(path, particles, blocks["optics"])
    else:
        loops = [b for b in blocks.values() if b.loop]
        if not loops:
            raise InputError(path, "no loop_ table of particles")
        table = _from_star30(path, loops[0], pixel_A)
    own = sorted({g.pixel_A for g in table.optics})
    if pixel_A is not None and any(abs(p - pixel_A) > 1e-3 * p for p in own):
        raise InputError(path, f"rlnImagePixelSize {own[0]:g} Å in the file, but {pixel_source} {pixel_A:g} Å")
    return table


class _Columns:
    """Typed access to STAR columns with errors that name the file and column."""

    def __init__(self, path: Path, block: StarBlock):
        self.path, self.block = path, block

    def has(self, name: str) -> bool:
        return name in self.block.columns

    def floats(self, name: str, default: float | None = None) -> np.ndarray:
        if name not in self.block.columns:
            if default is None:
                raise InputError(self.path, f"missing column {name}")
            return np.full(len(self.block), default, dtype=float)
        try:
            values = np.asarray(self.block.columns[name], dtype=float)
        except ValueError:
            raise InputError(self.path, f"column {name}: non-numeric value") from None
        if not np.isfinite(values).all():
            raise InputError(self.path, f"column {name}: NaN or infinite value")
        return values

    def positive(self, name: str) -> np.ndarray:
        """A column whose values must all be > 0 (a pixel size, a voltage)."""
        values = self.floats(name)
        if (values <= 0).any():
            raise InputError(self.path, f"column {name}: value {values[values <= 0][0]:g} (must be positive)")
        return values


def _from_star31(path: Path, particles: StarBlock, optics_block: StarBlock) -> ParticleTable:
    if len(optics_block) == 0:
        raise InputError(path, "data_optics has no rows")
    opt = _Columns(path, optics_block)
    numbers = opt.floats("rlnOpticsGroup").astype(int)
    names = optics_block.columns.get("rlnOpticsGroupName", [f"opticsGroup{g}" for g in numbers])
    pixel = opt.positive("rlnImagePixelSize")
    box = opt.floats("rlnImageSize", default=0).astype(int)
    optics = [
        OpticsGroup(names[i], v, cs, ac, float(pixel[i]), int(box[i]) or None)
        for i, (v, cs, ac) in enumerate(zip(opt.positive("rlnVoltage"), opt.floats("rlnSphericalAberration"),
                                             _contrast(opt)))
    ]
    col = _Columns(path, particles)
    group_number = col.floats("rlnOpticsGroup", default=numbers[0]).astype(int)
    lookup = {int(g): i for i, g in enumerate(numbers)}
    missing = sorted(set(group_number.tolist()) - set(lookup))
    if missing:
        raise InputError(path, f"rlnOpticsGroup: value {missing[0]} has no row in data_optics")
    groups = np.array([lookup[g] for g in group_number], dtype=int)
    pixel_per_particle = pixel[groups]
    shift = _origins(col, "rlnOriginXAngst", "rlnOriginYAngst", 1.0)
    if shift is None:
        shift = _origins(col, "rlnOriginX", "rlnOriginY", pixel_per_particle)
    return _table(path, col, optics, groups, shift)


def _from_star30(path: Path, particles: StarBlock, pixel_A: float | None) -> ParticleTable:
    col = _Columns(path, particles)
    if col.has("rlnImagePixelSize"):
        pixel = col.positive("rlnImagePixelSize")
    elif col.has("rlnDetectorPixelSize") and col.has("rlnMagnification"):
        pixel = col.positive("rlnDetectorPixelSize") * 1e4 / col.positive("rlnMagnification")
    elif pixel_A is not None:
        pixel = np.full(len(particles), float(pixel_A))
    else:
        raise InputError(path, "STAR 3.0 without rlnDetectorPixelSize/rlnMagnification: give the pixel size")
    if col.has("rlnDefocusU"):
        optics_keys = np.stack([col.positive("rlnVoltage"), col.floats("rlnSphericalAberration"),
                                _contrast(col), pixel], axis=1)
    else:
        optics_keys = np.stack([np.full_like(pixel, 300.0), np.full_like(pixel, 2.7),
                                np.full_like(pixel, 0.1), pixel], axis=1)
    unique, groups = np.unique(optics_keys, axis=0, return_inverse=True)
    optics = [OpticsGroup(f"opticsGroup{i + 1}", *map(float, row)) for i, row in enumerate(unique)]
    shift = _origins(col, "rlnOriginX", "rlnOriginY", pixel)
    if shift is None:
        shift = _origins(col, "rlnOriginXAngst", "rlnOriginYAngst", 1.0)
    return _table(path, col, optics, groups.reshape(-1), shift)


def _contrast(col: _Columns) -> np.ndarray:
    values = col.floats("rlnAmplitudeContrast")
    bad = (values < 0) | (values >= 1)
    if bad.any():
        raise InputError(col.path, f"column rlnAmplitudeContrast: value {values[bad][0]:g} (must be in [0, 1))")
    return values


def _origins(col: _Columns, x: str, y: str, scale_A) -> np.ndarray | None:
    if not (col.has(x) or col.has(y)):
        return None
    return np.stack([col.floats(x, 0.0), col.floats(y, 0.0)], axis=1) * np.reshape(scale_A, (-1, 1))


def _table(path: Path, col: _Columns, optics, groups, shift) -> ParticleTable:
    block = col.block
    if len(block) == 0:
        raise InputError(path, "the particle table has no rows")
    angles = None
    if any(col.has(c) for c in _POSE_COLUMNS):
        angles = np.stack([col.floats(c) for c in _POSE_COLUMNS], axis=1)
    ctf = {}
    partial = [c for c in ("rlnDefocusV", "rlnDefocusAngle", "rlnVoltage") if col.has(c)]
    if partial and not col.has("rlnDefocusU") and col.has("rlnDefocusV"):
        raise InputError(path, f"missing column rlnDefocusU (the file has {', '.join(partial)})")
    if col.has("rlnDefocusU"):
        ctf = {f: col.floats(c, default) for c, (f, default) in _CTF_COLUMNS.items()}
        if not col.has("rlnDefocusV"):
            ctf["defocus_v_A"] = ctf["defocus_u_A"]
    subset = None
    if col.has("rlnRandomSubset"):
        subset = col.floats("rlnRandomSubset").astype(int)
        bad = set(subset.tolist()) - {1, 2}
        if bad:
            raise InputError(path, f"column rlnRandomSubset: value {min(bad)} (expected 1 or 2)")
    extra = {k: v for k, v in block.columns.items() if k not in _KNOWN}
    return ParticleTable(optics=optics, optics_group=np.asarray(groups, dtype=int),
                         image_name=block.columns.get("rlnImageName"), angles_deg=angles,
                         shift_A=shift, random_subset=subset, extra=extra, source=path, **ctf)


def write_particles(path: str | Path, table: ParticleTable) -> None:
    """Write a RELION 3.1 particle STAR file (optics + particles blocks), atomically."""
    optics = StarBlock({
        "rlnOpticsGroupName": [g.name for g in table.optics],
        "rlnOpticsGroup": [str(i + 1) for i in range(len(table.optics))],
        "rlnVoltage": [_fmt(g.voltage_kV) for g in table.optics],
        "rlnSphericalAberration": [_fmt(g.cs_mm) for g in table.optics],
        "rlnAmplitudeContrast": [_fmt(g.amplitude_contrast) for g in table.optics],
        "rlnImagePixelSize": [_fmt(g.pixel_A) for g in table.optics],
        "rlnImageDimensionality": ["2"] * len(table.optics),
    })
    if all(g.box_px for g in table.optics):
        optics.columns["rlnImageSize"] = [str(g.box_px) for g in table.optics]
    columns: dict[str, list[str]] = {}
    if table.image_name is not None:
        columns["rlnImageName"] = list(table.image_name)
    if table.angles_deg is not None:
        for i, name in enumerate(_POSE_COLUMNS):
            columns[name] = _fmt_all(table.angles_deg[:, i])
    columns["rlnOriginXAngst"] = _fmt_all(table.shift_A[:, 0])
    columns["rlnOriginYAngst"] = _fmt_all(table.shift_A[:, 1])
    if table.has_ctf:
        for name, (attribute, _) in _CTF_COLUMNS.items():
            columns[name] = _fmt_all(getattr(table, attribute))
    columns["rlnOpticsGroup"] = [str(g + 1) for g in table.optics_group]
    if table.random_subset is not None:
        columns["rlnRandomSubset"] = [str(s) for s in table.random_subset]
    columns.update(table.extra)
    write_star(path, {"optics": optics, "particles": StarBlock(columns)})


def _fmt(value: float) -> str:
    return f"{value:.6f}"


def _fmt_all(values: np.ndarray) -> list[str]:
    return [f"{v:.6f}" for v in np.asarray(values, dtype=float)]
