"""The CPU slice kernels (``trilinear.c``), compiled at first use and run on threads.

PyTorch has no fused gather or scatter for the CPU: its eager kernels build the stencil's
``(8, points)`` indices, weights and weighted values as temporaries (three quarters of the
eager back-projection's time), and inductor's compiled scatter adds with float atomics.
``trilinear.c`` does the stencil and the 8 · C reads or additions point by point in one pass.
It is built by the system's C compiler (``cc``, or ``$CC``; about 0.3 s) into
``$CRYOSGD_CACHE`` (default ``~/.cache/cryosgd``) under a name hashed from the source and the
flags, once per machine, and loaded with ``ctypes``, which releases the GIL during a call: the
points are split among :func:`torch.get_num_threads` Python threads; a gather's threads write
their own rows, a scatter's add into their own accumulators, summed in a fixed order (the
result does not depend on timing).

Without a C compiler, or with ``CRYOSGD_NATIVE=0``, :func:`available` is False and the caller
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

_SOURCE = Path(__file__).with_name("trilinear.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")
_SUFFIX = {torch.float32: "float", torch.float64: "double"}
_SPLIT_POINTS = 65536  # points per thread at least: below, a thread's hand-off costs more than it saves


def cache_dir() -> Path:
    return Path(os.environ.get("CRYOSGD_CACHE") or Path.home() / ".cache" / "cryosgd")


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return None
    try:
        key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
        path = cache_dir() / f"trilinear-{key}.so"
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
        warnings.warn(f"building {_SOURCE.name} failed ({detail.strip()[:200]}); slicing with PyTorch",
                      RuntimeWarning, stacklevel=3)
        return None
    for kind in ("gather", "scatter"):
        for suffix in _SUFFIX.values():
            getattr(library, f"{kind}_{suffix}").restype = None
    return library


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="cryosgd-slice")


def available(like: Tensor, powers: tuple[int, ...] = (1,)) -> bool:
    """Whether the kernels serve tensors like ``like`` (and a scatter with these weight powers)."""
    return (like.device.type == "cpu" and like.dtype in _SUFFIX and not like.requires_grad
            and set(powers) <= {1, 2} and os.environ.get("CRYOSGD_NATIVE", "1") != "0" and _library() is not None)


def gather(centred: Tensor, rotations: Tensor, freq_px: Tensor, nearest: bool) -> Tensor:
    """``centred (n + 1, n + 1, n // 2 + 1, C, 2)`` real views of C centred maps → their
    ``(B, P, C, 2)`` values at the slice points of ``rotations (B, 3, 3)`` and ``freq_px (P, 2)``
    (``slice._extract_corners``' arithmetic)."""
    n, channels = centred.shape[0] - 1, centred.shape[3]
    centred, rotations, freq_px = (t.to(centred.dtype).contiguous() for t in (centred, rotations, freq_px))
    out = centred.new_empty(rotations.shape[0], freq_px.shape[0], channels, 2)
    function = getattr(_library(), f"gather_{_SUFFIX[centred.dtype]}")
    _split(out.shape[0] * out.shape[1], lambda start, stop, _: function(
        _ptr(rotations), _ptr(freq_px), ctypes.c_long(freq_px.shape[0]), _ptr(centred), ctypes.c_long(channels),
        ctypes.c_int(int(nearest)), ctypes.c_long(n), _ptr(out), ctypes.c_long(start), ctypes.c_long(stop)))
    return out


def scatter(out: Tensor, channels: Tensor, rotations: Tensor, freq_px: Tensor, n: int, nearest: bool,
            conjugate: tuple[bool, ...], powers: tuple[int, ...]) -> None:
    """Add ``channels (C, B, P)`` at the slice points of ``rotations (B, 3, 3)`` and
    ``freq_px (P, 2)`` into the centred half-grids ``out (C, (n + 1)² · (n // 2 + 1))``
    (``slice._insert_corners``' arithmetic). All real, of one dtype, on the CPU."""
    channels, rotations, freq_px = (t.to(out.dtype).contiguous() for t in (channels, rotations, freq_px))
    total = channels.shape[1] * channels.shape[2]
    function = getattr(_library(), f"scatter_{_SUFFIX[out.dtype]}")
    flags = [(ctypes.c_int * len(conjugate))(*map(int, conjugate)), (ctypes.c_int * len(powers))(*powers)]
    accumulators = [out]

    def run(start: int, stop: int, part: int) -> None:
        function(_ptr(rotations), _ptr(freq_px), ctypes.c_long(channels.shape[2]), _ptr(channels),
                 ctypes.c_long(channels.shape[0]), ctypes.c_long(total), *flags, ctypes.c_int(int(nearest)),
                 ctypes.c_long(n), _ptr(accumulators[part]), ctypes.c_long(out.shape[1]), ctypes.c_long(start),
                 ctypes.c_long(stop))

    threads = _threads(total)
    accumulators += [torch.zeros_like(out) for _ in range(threads - 1)]
    _split(total, run)
    for extra in accumulators[1:]:
        out += extra


def _ptr(tensor: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _threads(total: int) -> int:
    return max(1, min(torch.get_num_threads(), total // _SPLIT_POINTS))


def _split(total: int, run) -> None:
    """``run(start, stop, part)`` over :func:`_threads` equal parts of ``range(total)``, in parallel."""
    threads = _threads(total)
    bounds = [total * i // threads for i in range(threads + 1)]
    if threads == 1:
        run(0, total, 0)
    else:
        list(_pool(threads).map(lambda part: run(bounds[part], bounds[part + 1], part), range(threads)))
