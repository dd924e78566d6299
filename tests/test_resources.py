"""What the process may use: the malloc setting the command line makes."""

import os
import subprocess
import sys
import textwrap

import pytest

resource = pytest.importorskip("resource")

# In a fresh interpreter (the setting is process-wide and cannot be undone): a 64 MiB block
# allocated, written and freed, then again; prints the page faults of the second time.
_SECOND_ALLOCATION_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    from cryosgd.resources import keep_freed_memory
    if sys.argv[1] == "keep" and not keep_freed_memory():
        sys.exit(3)
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    size = 64 << 20

    def written_and_freed():
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)

    written_and_freed()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    written_and_freed()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _SECOND_ALLOCATION_FAULTS, mode], capture_output=True, text=True,
                          env=env)
    if done.returncode == 3:
        pytest.skip("no glibc mallopt here")
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_freed_memory_is_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert _faults("default") > pages // 2  # glibc maps a large block afresh: a fault per page
    assert _faults("keep") < pages // 100


def test_a_malloc_tunable_in_the_environment_is_left_alone(monkeypatch):
    from cryosgd.resources import keep_freed_memory

    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False
