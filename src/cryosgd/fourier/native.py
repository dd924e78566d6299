"""The CPU back-projection kernel (``scatter.c``), compiled at first use and run on threads.

PyTorch has no fused scatter for the CPU: eager ``index_add_`` needs the stencil's
``(8, points)`` indices and weighted values as temporaries (three quarters of its time), and
inductor's compiled scatter adds with float atomics. ``scatter.c`` does the stencil and the
8 · C additions point by point in one pass. It is built by the system's C compiler (``cc``,
or ``$CC``; about 0.2 s) into ``$CRYOSGD_CACHE`` (default ``~/.cache/cryosgd``) under a name
hashed from the source and the flags, once per machine, and loaded with ``ctypes``, which
releases the GIL during the call: the points are split among :func:`torch.get_num_threads`
Python threads, each adding into its own accumulator, and the accumulators are summed in a
fixed order (the result does not depend on timing).

Without a C compiler, or with ``CRYOSGD_NATIVE=0``, :func:`scatter` is None and the caller
stays with PyTorch; a compiler that fails is reported once by a ``RuntimeWarning``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("scatter.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")
_FUNCTIONS = {torch.float32: "scatter_float", torch.float64: "scatter_double"}
_SPLIT_POINTS = 65536  # points per thread at least: below, a thread's hand-off costs more than it saves


def cache_dir() -> Path:
    return Path(os.environ.get("CRYOSGD_CACHE") or Path.home() / ".cache" / "cryosgd")


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    path = cache_dir() / f"scatter-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as work:
                built = Path(work) / path.name
                subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], check=True,
                               capture_output=True, text=True)
                os.replace(built, path)  # atomic: processes building at once each install a whole file
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"building {_SOURCE.name} failed ({detail.strip()[:200]}); back-projecting with PyTorch",
                      RuntimeWarning, stacklevel=3)
        return None
    for name in _FUNCTIONS.values():
        getattr(library, name).restype = None
    return library


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="cryosgd-scatter")


def available(like: Tensor, powers: tuple[int, ...]) -> bool:
    """Whether :func:`scatter` serves tensors like ``like`` with these weight powers."""
    return (like.device.type == "cpu" and like.dtype in _FUNCTIONS and set(powers) <= {1, 2}
            and os.environ.get("CRYOSGD_NATIVE", "1") != "0" and _library() is not None)


def scatter(out: Tensor, channels: Tensor, rotations: Tensor, freq_px: Tensor, n: int, nearest: bool,
            conjugate: tuple[bool, ...], powers: tuple[int, ...]) -> None:
    """Add ``channels (C, B, P)`` at the slice points of ``rotations (B, 3, 3)`` and
    ``freq_px (P, 2)`` into the centred half-grids ``out (C, (n + 1)² · (n // 2 + 1))``
    (``slice._insert_corners``' arithmetic). All real, of one dtype, on the CPU."""
    dtype = out.dtype
    channels, rotations, freq_px = (t.to(dtype).contiguous() for t in (channels, rotations, freq_px))
    total = channels.shape[1] * channels.shape[2]
    threads = max(1, min(torch.get_num_threads(), total // _SPLIT_POINTS))
    bounds = [total * i // threads for i in range(threads + 1)]
    outs = [out] + [torch.zeros_like(out) for _ in range(threads - 1)]
    function = getattr(_library(), _FUNCTIONS[dtype])
    flags = [(ctypes.c_int * len(conjugate))(*map(int, conjugate)), (ctypes.c_int * len(powers))(*powers)]

    def run(part: int) -> None:
        pointer = ctypes.c_void_p
        function(pointer(rotations.data_ptr()), pointer(freq_px.data_ptr()), ctypes.c_long(channels.shape[2]),
                 pointer(channels.data_ptr()), ctypes.c_long(channels.shape[0]), ctypes.c_long(total), *flags,
                 ctypes.c_int(int(nearest)), ctypes.c_long(n), pointer(outs[part].data_ptr()),
                 ctypes.c_long(out.shape[1]), ctypes.c_long(bounds[part]), ctypes.c_long(bounds[part + 1]))

    if threads == 1:
        run(0)
    else:
        list(_pool(threads).map(run, range(threads)))
    for extra in outs[1:]:
        out += extra
