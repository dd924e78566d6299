"""User-facing errors: one line that names the file, the field and the value."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: raised with a message the CLI prints as one line."""

    def __init__(self, path: str | Path | None, message: str):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
