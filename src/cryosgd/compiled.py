"""``torch.compile`` for hot paths, with one switch: ``CRYOSGD_COMPILE=0`` turns it off.

Shapes are specialised on the first call and turn dynamic only in the dimensions that
change later (the batch size), which keeps map shapes compile-time constants. One code
serves CPU and GPU.
"""

from __future__ import annotations

import os

import torch


def maybe_compile(fn):
    if os.environ.get("CRYOSGD_COMPILE", "1") == "0":
        return fn
    return torch.compile(fn)
