"""Atomic file writes: write a temporary file beside the target, then rename it.

The temporary file is created with mode 0666 minus the process's umask, like any file a
program opens for writing, so outputs get the permissions the user expects (a colleague, or
RELION under another account, can read them when the umask allows it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` on success.

    On any exception (Ctrl-C included) the temporary file is removed and `path` is left
    untouched, so a killed or failed write never leaves a half-written output.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_lines(path: str | Path, lines: list[str]) -> Path:
    """Write text lines atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    return Path(path)
