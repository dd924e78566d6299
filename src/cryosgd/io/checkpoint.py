"""Checkpoints: the whole state of a run after an epoch, written atomically.

A checkpoint is a dict of tensors, numbers, strings, lists and tuples (``torch.save``), loaded
back with ``weights_only=True``: no code is unpickled. Frozen dataclasses (a half-set's state,
an optimiser's state) are stored as dicts tagged with their class name by :func:`pack` and
rebuilt by :func:`unpack` from a list of the classes the caller allows. A run killed while
writing keeps the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from cryosgd.errors import InputError
from cryosgd.io.atomic import atomic_path

_TYPE = "__type__"


def pack(value):
    """Dataclasses → tagged dicts, numpy scalars → numbers, recursively through tuples, lists and dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_TYPE: type(value).__name__, **{f.name: pack(getattr(value, f.name))
                                                for f in dataclasses.fields(value) if f.init}}
    if isinstance(value, (tuple, list)):
        return type(value)(pack(v) for v in value)
    if isinstance(value, dict):
        return {k: pack(v) for k, v in value.items()}
    if isinstance(value, np.generic):  # a numpy scalar: stored as the Python number
        return value.item()
    return value


def unpack(value, types: list[type]):
    """Inverse of :func:`pack`; a tag outside ``types`` is an error."""
    if isinstance(value, dict) and _TYPE in value:
        known = {t.__name__: t for t in types}
        if value[_TYPE] not in known:
            raise ValueError(f"checkpoint holds an unknown state type {value[_TYPE]!r}")
        return known[value[_TYPE]](**{k: unpack(v, types) for k, v in value.items() if k != _TYPE})
    if isinstance(value, (tuple, list)):
        return type(value)(unpack(v, types) for v in value)
    if isinstance(value, dict):
        return {k: unpack(v, types) for k, v in value.items()}
    return value


def save_checkpoint(path: str | Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(pack(payload), tmp)


def load_checkpoint(path: str | Path, types: list[type] = (), device=None) -> dict:
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        return unpack(payload, list(types))
    except Exception as err:  # a truncated, foreign or outdated file: say which
        raise InputError(path, f"cannot read checkpoint ({err.__class__.__name__}); "
                               "start again without --resume (and with --force)") from None


_IDENTITY = (("star", "from another STAR file"), ("particles", "from another particle table"),
             ("stacks", "from other image stacks"), ("settings", "with other settings"))


def load_resumable(path: str | Path, identity: dict, types: list[type] = (), device=None) -> dict:
    """The checkpoint at ``path`` for ``--resume``, refused in one line when there is none or
    when its ``identity`` differs from ``identity`` (the STAR file's path, a digest of its
    particle table, the stacks' paths and sizes, the settings), naming what differs."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "--resume: no checkpoint here; run without --resume to start")
    saved = load_checkpoint(path, types, device)
    theirs = saved.get("identity", {})
    for key, what in _IDENTITY:
        if theirs.get(key) != identity[key]:
            detail = f" ({theirs.get('star')})" if key == "star" else _difference(theirs.get(key), identity[key])
            raise InputError(path, f"--resume: made {what}{detail}; "
                                   "choose another -o, or drop --resume and add --force to start over")
    return saved


def _difference(theirs, ours) -> str:
    """`` (name old → new, …)`` for the settings that differ, or nothing."""
    if not isinstance(theirs, dict) or not isinstance(ours, dict):
        return ""
    changed = [f"{k} {theirs.get(k)} → {ours.get(k)}" for k in ours if theirs.get(k) != ours.get(k)]
    return f" ({', '.join(changed)})" if changed else ""
