"""The CPU slice kernels (``trilinear.c``), compiled at first use and run on threads.

PyTorch has no fused gather or scatter for the CPU: its eager kernels build the stencil's
``(8, points)`` indices, weights and weighted values as temporaries (three quarters of the
eager back-projection's time), and inductor's compiled scatter adds with float atomics.
``trilinear.c`` does the stencil and the 8 · C reads or additions point by point in one pass.
It is built by the system's C compiler (``cc``, or ``$CC``; about 0.3 s) into
``$CRYOSGD_CACHE`` (default ``~/.cache/cryosgd``) under a name hashed from the source, the
flags, the compiler and the machine, once per cache folder, and loaded with ``ctypes``, which
releases the GIL during a call: the points are split among up to :func:`torch.get_num_threads`
Python threads; a gather's threads write their own rows, a scatter's add into their own
channel-last accumulators (at most 1 GiB of them beyond the first), summed in a fixed order.
Results do not depend on timing; a scatter's rounding depends on how many threads shared it.

Without a C compiler, or with ``CRYOSGD_NATIVE=0``, :func:`available` is False and the caller
stays with PyTorch, as it does for tensors that need autograd or live on a GPU; a compiler
that fails is reported once by a ``RuntimeWarning``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("trilinear.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math")
_SUFFIX = {torch.float32: "float", torch.float64: "double"}
_SPLIT_POINTS = 65536  # points per thread at least: below, a thread's hand-off costs more than it saves
_ACCUMULATOR_BYTES = 1 << 30  # a scatter's extra per-thread accumulators, at most


def cache_dir() -> Path:
    return Path(os.environ.get("CRYOSGD_CACHE") or Path.home() / ".cache" / "cryosgd")


@functools.cache
def _library() -> ctypes.CDLL | None:
    command = shlex.split(os.environ.get("CC") or "cc")
    compiler = shutil.which(command[0]) if command else None
    if compiler is None:
        return None
    try:
        identity = b" ".join([_SOURCE.read_bytes(), *(a.encode() for a in (*_FLAGS, *command, compiler)),
                              platform.machine().encode(), sys.platform.encode()])
        path = cache_dir() / f"trilinear-{hashlib.sha256(identity).hexdigest()[:16]}.so"
        if path.exists():
            try:
                return _bind(ctypes.CDLL(str(path)))
            except OSError:  # unloadable (truncated, another machine's): build it again
                pass
        _build([compiler, *command[1:]], path)
        return _bind(ctypes.CDLL(str(path)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"building {_SOURCE.name} in {cache_dir()} failed ({detail.strip()[:200]}); slicing with "
                      "PyTorch (CRYOSGD_CACHE names another folder, CRYOSGD_NATIVE=0 skips the build)",
                      RuntimeWarning, stacklevel=3)
        return None


def _build(compiler: list[str], path: Path) -> None:
    """Compile into a temporary folder beside ``path``, then move the library into place
    (atomic: processes that build at once each install a whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        built = Path(work) / path.name
        subprocess.run([*compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, path)


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    for kind in ("gather", "scatter"):
        for suffix in _SUFFIX.values():
            getattr(library, f"{kind}_{suffix}").restype = None
    return library


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="cryosgd-slice")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the parent's threads


def available(*tensors: Tensor, powers: tuple[int, ...] = (1,)) -> bool:
    """Whether the kernels serve these tensors (on the CPU, float32 or float64 for the first,
    none needing autograd) and a scatter with these weight powers."""
    return (tensors[0].dtype in _SUFFIX and all(t.device.type == "cpu" and not t.requires_grad for t in tensors)
            and set(powers) <= {1, 2} and os.environ.get("CRYOSGD_NATIVE", "1") != "0" and _library() is not None)


def gather(centred: Tensor, rotations: Tensor, freq_px: Tensor, nearest: bool) -> Tensor:
    """``centred (n + 1, n + 1, n // 2 + 1, C, 2)`` real views of C centred maps → their
    ``(B, P, C, 2)`` values at the slice points of ``rotations (B, 3, 3)`` and ``freq_px (P, 2)``
    (``slice._extract_corners``' arithmetic)."""
    n, channels = centred.shape[0] - 1, centred.shape[3]
    _check(rotations, freq_px)
    centred, rotations, freq_px = (t.to(centred.dtype).contiguous() for t in (centred, rotations, freq_px))
    out = centred.new_empty(rotations.shape[0], freq_px.shape[0], channels, 2)
    function = getattr(_library(), f"gather_{_SUFFIX[centred.dtype]}")
    total = out.shape[0] * out.shape[1]
    _split(total, _threads(total), lambda start, stop, _: function(
        _ptr(rotations), _ptr(freq_px), _int(freq_px.shape[0]), _ptr(centred), _int(channels),
        ctypes.c_int(int(nearest)), _int(n), _ptr(out), _int(start), _int(stop)))
    return out


def scatter(out: Tensor, channels: Tensor, rotations: Tensor, freq_px: Tensor, n: int, nearest: bool,
            conjugate: tuple[bool, ...], powers: tuple[int, ...], source: Tensor | None = None,
            scale: Tensor | None = None) -> None:
    """Add ``channels (C, S, P)`` at the slice points of ``rotations (R, 3, 3)`` and
    ``freq_px (P, 2)`` into the centred half-grids ``out (C, (n + 1)² · (n // 2 + 1))``
    (``slice._insert_corners``' arithmetic): row r adds image ``source[r]`` (``r`` without
    ``source (R,)``, then S = R) times ``scale[r]`` (1 without ``scale (R,)``). All real, of one
    dtype, on the CPU."""
    _check(rotations, freq_px)
    low, high = (0, -1) if source is None or not len(source) else tuple(map(int, source.aminmax()))
    if not out.is_contiguous() or out.shape != (channels.shape[0], (n + 1) ** 2 * (n // 2 + 1)) or \
            channels.shape[2] != freq_px.shape[0] or low < 0 or high >= channels.shape[1] or \
            (source is None and channels.shape[1] != rotations.shape[0]) or \
            any(t is not None and t.shape != (rotations.shape[0],) for t in (source, scale)):
        raise ValueError(f"scatter: channels {tuple(channels.shape)}, rotations {tuple(rotations.shape)}, "
                         f"frequencies {tuple(freq_px.shape)} and accumulator {tuple(out.shape)} do not match")
    channels, rotations, freq_px = (t.to(out.dtype).contiguous() for t in (channels, rotations, freq_px))
    source = None if source is None else source.to(torch.int64).contiguous()
    scale = None if scale is None else scale.to(out.dtype).contiguous()
    total = rotations.shape[0] * freq_px.shape[0]
    function = getattr(_library(), f"scatter_{_SUFFIX[out.dtype]}")
    flags = [(ctypes.c_int * len(conjugate))(*map(int, conjugate)), (ctypes.c_int * len(powers))(*powers)]
    affordable = 1 + min(total // out.shape[1], _ACCUMULATOR_BYTES // (out.numel() * out.element_size()))
    threads = min(_threads(total), affordable)  # extra accumulators only where the points outweigh them
    # channel-last, so that a point's C values share cache lines; added to ``out`` at the end
    accumulators = [out.new_zeros(out.shape[1], out.shape[0]) for _ in range(threads)]
    _split(total, threads, lambda start, stop, part: function(
        _ptr(rotations), _ptr(freq_px), _int(freq_px.shape[0]), _ptr(channels), _int(channels.shape[0]),
        _int(channels.shape[1] * channels.shape[2]), _ptr(source), _ptr(scale), *flags, ctypes.c_int(int(nearest)),
        _int(n), _ptr(accumulators[part]), _int(start), _int(stop)))
    for accumulator in accumulators:
        out += accumulator.T


def _check(rotations: Tensor, freq_px: Tensor) -> None:
    if rotations.shape[1:] != (3, 3) or freq_px.shape[1:] != (2,):
        raise ValueError(f"rotations {tuple(rotations.shape)} must be (B, 3, 3), frequencies "
                         f"{tuple(freq_px.shape)} (P, 2)")


def _ptr(tensor: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())


def _int(value: int) -> ctypes.c_int64:
    return ctypes.c_int64(value)


def _threads(total: int) -> int:
    return max(1, min(torch.get_num_threads(), total // _SPLIT_POINTS))


def _split(total: int, threads: int, run) -> None:
    """``run(start, stop, part)`` over ``threads`` equal parts of ``range(total)``, in parallel."""
    bounds = [total * i // threads for i in range(threads + 1)]
    if threads == 1:
        run(0, total, 0)
    else:
        list(_pool(torch.get_num_threads()).map(lambda part: run(bounds[part], bounds[part + 1], part),
                                                range(threads)))
