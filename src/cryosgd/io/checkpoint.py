"""Checkpoints: the whole state of a run after an epoch, written atomically.

A checkpoint is a dict of tensors, numbers and strings (``torch.save``), loaded back with
``weights_only=True``: no code is unpickled. A run killed while writing keeps the previous one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cryosgd.errors import InputError
from cryosgd.io.atomic import atomic_path


def save_checkpoint(path: str | Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, device=None) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise InputError(path, f"cannot read checkpoint ({err.__class__.__name__})") from None
