"""What this process may use: CPU threads, memory and the torch device.

Threads: the CPUs the process may actually run on (its affinity mask, then a cgroup CPU
quota, then ``OMP_NUM_THREADS``), unless ``--threads`` says otherwise. Idle OpenMP workers
sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, set before torch is first imported), so
a busy machine slows a run in proportion to the load rather than many times over.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

from cryosgd.errors import InputError


def quiet_openmp() -> None:
    """Ask OpenMP's idle threads to sleep; effective only before torch is first imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc's mallopt options (malloc.h)


def keep_freed_memory() -> bool:
    """Let the C library's malloc keep freed memory for reuse instead of handing it back to the
    kernel; True if it was set.

    glibc serves each allocation above its mmap threshold (128 KiB, rising to 32 MiB) by a fresh
    mapping and unmaps it when freed, so every large temporary of a pose search or a scatter
    costs a page fault per 4 KiB and the kernel's zeroing of each page: a third of the CPU time
    of a box-128 refinement iteration on a 2-core virtual machine (docs/benchmarks.md). Served
    from the heap instead (no mmap), grown 256 MiB at a time and trimmed only when 2 GiB lie
    free at its top, they reuse pages that are already mapped. The price is memory: the process
    keeps the heap of its busiest moment, fragments included, until it exits (box-64
    refinement: peak 1.2 → 1.6 GB). The command line calls this; a library import does not.
    A no-op without glibc's ``mallopt`` (macOS) or where the environment sets a ``MALLOC_*``
    tunable of its own.
    """
    if any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS), no CDLL(None) (Windows)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_MMAP_MAX, 0), (_M_TOP_PAD, 256 << 20), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all([mallopt(option, value) == 1 for option, value in settings])


def usable_cpus() -> int:
    """CPUs this process may use: affinity ∩ cgroup quota ∩ ``OMP_NUM_THREADS``."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        count = min(count, int(omp))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (or v1 ``cfs_quota_us``), None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: :func:`usable_cpus`); returns it."""
    import torch

    if threads is not None and threads < 1:
        raise InputError(None, f"--threads {threads}: must be at least 1")
    count = usable_cpus() if threads is None else threads
    torch.set_num_threads(count)
    return count


def available_memory_bytes(device=None) -> int:
    """Memory this process could still allocate: on a CUDA ``device`` that GPU's free memory;
    otherwise MemAvailable, capped by a cgroup limit."""
    import torch

    if device is not None and torch.device(device).type == "cuda":  # free, and cached by torch but unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        if limit != "max":
            available = min(available, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return max(0, available)


def resolve_device(name: str | None):
    """``--device`` → a usable ``torch.device``; one line listing the devices that exist if not.
    A GPU named by index (``cuda:1``) becomes the current device, which CUDA calls without a
    device (a synchronize, a new context) use."""
    import torch

    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(None, f"--device {name}: not a device name; available: {', '.join(available_devices())}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count and (device.index is None or device.index < count):
            if device.index is not None:
                torch.cuda.set_device(device)
            return device
    elif device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise InputError(None, f"--device {name}: not available in this torch build ({torch.__version__}); "
                           f"available: {', '.join(available_devices())}")


def available_devices() -> list[str]:
    """The device names this torch build can use here, e.g. ``["cpu", "cuda:0"]``."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names
