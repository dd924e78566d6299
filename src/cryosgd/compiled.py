"""``torch.compile`` for hot paths, with one switch: ``CRYOSGD_COMPILE=0`` turns it off.

Shapes are specialised on the first call and turn dynamic only in the dimensions that
change later (the batch size), which keeps map shapes compile-time constants. One code
serves CPU and GPU. The kernels take their channel layout (how many maps, which weight
powers) and interpolation as constants, so a long session (the paper reproduction) meets more
variants than torch's default of 8 recompilations per function; the limit is raised to 64
so that they all stay compiled.
"""

from __future__ import annotations

import os

import torch


_RECOMPILE_LIMIT = 64


def maybe_compile(fn):
    if os.environ.get("CRYOSGD_COMPILE", "1") == "0":
        return fn
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(fn)
