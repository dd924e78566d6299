"""Where outputs go: checked before any work starts, never over an input, locked while written.

Rules (the same for every command):

- An output never replaces an input file (the same file by any path): always an error.
- An existing output is replaced only with ``--force``, or when the folder holds this
  command's own previous run (its ``run.json`` names the same command).
- An output folder is locked (``.cryosgd.lock``, an advisory ``flock`` that the system
  releases when the process ends, however it ends) while a run writes into it; a second run
  into the same folder stops with one line.
- Paths that cannot work (an ``-o`` folder that is a file, a stack path that is a folder, a
  folder that cannot be created or written) are reported before anything is read.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from cryosgd.errors import InputError
from cryosgd.io.atomic import atomic_path

RUN_FILE = "run.json"
LOCK_FILE = ".cryosgd.lock"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_inputs(outputs: Iterable[Path], inputs: Iterable[Path | None]) -> None:
    inputs = [Path(i) for i in inputs if i is not None]
    for out in outputs:
        for source in inputs:
            if _same_file(out, source) or out.resolve() == source.resolve():
                raise InputError(out, f"would overwrite the input {source}; choose another output")


def _writable_folder(folder: Path, option: str) -> None:
    """Create ``folder`` (and parents) if needed and check that files can be made in it."""
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, f"{option}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(folder, f"{option}: cannot create the folder ({err.strerror.lower()})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(folder, f"{option}: folder is not writable")


def check_new_files(paths: list[Path], inputs: Iterable[Path | None], force: bool, option: str = "-o") -> None:
    """Before writing the files ``paths``: not inputs, not folders, not existing (unless
    ``force``), and in a writable folder."""
    _refuse_inputs(paths, inputs)
    for path in paths:
        if path.is_dir():
            raise InputError(path, f"{option}: is a folder, expected a file name")
        if path.exists() and not force:
            raise InputError(path, f"{option}: exists; use --force to replace it")
        _writable_folder(path.parent, option)


class OutputFolder:
    """A command's output folder, held (locked) from :meth:`open` until :meth:`close`.

    A run that ends in an error (or Ctrl-C) before it has written any output leaves the folder
    as it found it: the lock file and ``run.json`` are put back as they were, and a folder it
    created is removed.

    Args:
        path: the folder.
        command: the command's name, recorded in ``run.json``.
        outputs: names (relative to ``path``) of the files the command may write.
        inputs: files the command reads; none may be an output.
        force: replace existing outputs of another run.
        writer: False on processes that write nothing (ranks > 0): no checks, no lock.
    """

    def __init__(self, path: str | Path, command: str, outputs: Iterable[str], inputs: Iterable[Path | None] = (),
                 force: bool = False, writer: bool = True):
        if str(path) == "":
            raise InputError(None, "-o: an empty path (an unset shell variable?); give an output folder")
        self.path, self.command, self.force, self.writer = Path(path), command, force, writer
        self.outputs, self.inputs = [self.path / name for name in outputs], list(inputs)
        self._lock_fd: int | None = None
        self._before: dict[Path, object] = {}

    def open(self) -> OutputFolder:
        if not self.writer:
            return self
        created = not self.path.exists()
        _writable_folder(self.path, "-o")
        self._before = {"created": created, **{p: _stamp(p) for p in self.outputs},
                        RUN_FILE: _content(self.path / RUN_FILE), LOCK_FILE: (self.path / LOCK_FILE).exists()}
        try:
            _refuse_inputs(self.outputs + [self.path / RUN_FILE], self.inputs)
            existing = [p for p in self.outputs if p.exists()]
            if existing and not self.force and self.previous_command() != self.command:
                raise InputError(existing[0], "exists and is not from an earlier `cryosgd "
                                              f"{self.command}` run in this folder; use --force to replace it")
            self._lock()
            with atomic_path(self.path / RUN_FILE) as tmp:
                tmp.write_text(json.dumps({"command": self.command, "argv": sys.argv[1:],
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
        except BaseException:
            self._undo()
            raise
        return self

    def previous_command(self) -> str | None:
        try:
            return json.loads((self.path / RUN_FILE).read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            return None

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(self.path, f"another cryosgd run (process {holder}) is writing into this folder; "
                                        "wait for it to finish or choose another -o") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the file stays (removing it would race)
            self._lock_fd = None

    def wrote_outputs(self) -> bool:
        return any(_stamp(p) != self._before.get(p) for p in self.outputs)

    def _undo(self) -> None:
        """Put the folder back as :meth:`open` found it (nothing of this run was written)."""
        run_json = self._before.get(RUN_FILE)
        if run_json is None:
            (self.path / RUN_FILE).unlink(missing_ok=True)
        else:
            content, times_ns = run_json
            with atomic_path(self.path / RUN_FILE) as tmp:
                tmp.write_bytes(content)
            os.utime(self.path / RUN_FILE, ns=times_ns)
        if not self._before.get(LOCK_FILE):
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        self.close()
        if self._before.get("created"):
            try:
                self.path.rmdir()
            except OSError:
                pass

    def __enter__(self) -> OutputFolder:
        return self.open()

    def __exit__(self, error_type, *exc) -> None:
        """Release the lock; after a failure that wrote no output, undo the run's traces."""
        if error_type is not None and self.writer and not self.wrote_outputs():
            self._undo()
        self.close()


def _stamp(path: Path) -> tuple[int, int] | None:
    """(size, modification time) of a file, or None when there is none."""
    try:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
    except OSError:
        return None


def _content(path: Path) -> tuple[bytes, tuple[int, int]] | None:
    """A file's bytes and its (access, modification) times in ns, or None when there is none."""
    try:
        stat = path.stat()
        return path.read_bytes(), (stat.st_atime_ns, stat.st_mtime_ns)
    except OSError:
        return None
