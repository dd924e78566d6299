"""Tiered ``torch.compile`` for hot paths: eager first, compiled once a function has cost enough.

``maybe_compile(fn)`` returns a callable that runs ``fn`` eagerly and times each call
(``perf_counter``, after ``torch.cuda.synchronize`` when an argument is on CUDA). Once
the eager calls of that function have taken more than ``CRYOSGD_COMPILE_AFTER_S`` seconds in
all (default 10: a compilation costs 5 s with a warm cache, 20 s with a cold one, and a
run that has spent 10 s in a kernel is likely to spend more), it switches to ``torch.compile`` of it, so
short runs never pay for compilation, nor for importing ``torch._dynamo``, and long runs
get the fused kernels. ``maybe_compile(fn, compile_fn)`` compiles ``compile_fn`` instead:
the same function written for the compiler (tests check that the two agree).

``CRYOSGD_COMPILE`` (read at each call): ``auto`` (default) the rule above, ``1`` compile
at the first call, ``0`` never compile.

If compiling or running the compiled function fails (no C++ compiler for inductor's CPU
backend, an inductor error) while the eager function succeeds on the same arguments, that
function stays eager for the rest of the process; the first such failure is reported by one
``RuntimeWarning``. (Compilation fails before the compiled code runs, so a kernel that writes
into an argument does not write twice.)

Shapes are specialised at the first compilation and turn dynamic in the dimensions that change
later (torch's automatic dynamic shapes): a known-pose reconstruction keeps its specialised,
faster kernels; refinement and ab initio, whose band changes, get dynamic ones after one more
compilation. The kernels take their
channel layout (how many maps, which weight powers) and interpolation as constants, so a long
session (the paper reproduction) meets more variants than torch's default of 8 compilations
per function; the limit is raised to 64 so that they all stay compiled.

On the CPU, inductor needs a C++ compiler and Python's headers (``g++``, ``python3-dev``); where
they are missing, functions stay eager without a word (:func:`cpu_compiler_available`).
``maybe_compile(..., on_cpu=False)`` compiles only for CUDA tensors: the scatter, whose
compiled CPU version (float atomics) is no faster than the eager one's serial ``index_add_``
(docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import os
import shutil
import sysconfig
import time
import warnings
from pathlib import Path

import torch

_RECOMPILE_LIMIT = 64
_DEFAULT_AFTER_S = 10.0
_warned = False


def maybe_compile(fn, compile_fn=None, *, on_cpu: bool = True):
    """``fn`` run eagerly, then as ``torch.compile(compile_fn or fn)`` (module docstring);
    with ``on_cpu=False`` only calls on CUDA tensors are ever compiled."""
    return _Tiered(fn, compile_fn or fn, on_cpu)


@functools.cache
def cpu_compiler_available() -> bool:
    """Whether inductor can build CPU kernels here: a C++ compiler and Python's headers. Without
    them (a stock Debian has neither) everything stays eager, silently: nothing is wrong."""
    compiler = os.environ.get("CXX") or "g++"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return bool(shutil.which(compiler) or shutil.which("c++")) and headers.exists()


def _setting() -> str:
    value = os.environ.get("CRYOSGD_COMPILE", "auto")
    if value not in ("0", "1", "auto"):
        raise ValueError(f"CRYOSGD_COMPILE={value!r}: must be 0, 1 or auto")
    return value


def _compile_after_s() -> float:
    return float(os.environ.get("CRYOSGD_COMPILE_AFTER_S", _DEFAULT_AFTER_S))


def _on_cuda(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


class _Tiered:
    """Eager calls of ``eager_fn``, timed, until they pass the threshold; then ``compile_fn`` compiled."""

    def __init__(self, eager_fn, compile_fn, on_cpu: bool = True):
        functools.update_wrapper(self, eager_fn)
        self.eager_fn, self.compile_fn, self.on_cpu = eager_fn, compile_fn, on_cpu
        self.eager_s = 0.0
        self.compiled = None
        self.failed = False

    def __call__(self, *args, **kwargs):
        setting = _setting()
        cuda = _on_cuda(args) or _on_cuda(kwargs.values())
        may_compile = setting != "0" and not self.failed and (cuda or (self.on_cpu and cpu_compiler_available()))
        if not may_compile:
            return self.eager_fn(*args, **kwargs)
        if self.compiled is None and (setting == "1" or self.eager_s > _compile_after_s()):
            self.compiled = self._compile()
        if self.compiled is not None:
            return self._call_compiled(args, kwargs)
        start = time.perf_counter()
        result = self.eager_fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        self.eager_s += time.perf_counter() - start
        return result

    def _compile(self):
        try:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
            return torch.compile(self.compile_fn)
        except Exception as error:  # noqa: BLE001 - any failure of the compiler means: stay eager
            self._give_up(error)
            return None

    def _call_compiled(self, args, kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:
            result = self.eager_fn(*args, **kwargs)  # raises again if the arguments are at fault
            self._give_up(error)
            return result

    def _give_up(self, error: Exception) -> None:
        global _warned
        self.failed, self.compiled = True, None
        if not _warned:
            _warned = True
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile failed for {self.compile_fn.__name__} ({type(error).__name__}: {reason}); "
                          "running it eagerly", RuntimeWarning, stacklevel=4)
