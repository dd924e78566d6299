"""Reading and writing STAR files (the RELION flavour of CIF).

A file is a sequence of ``data_NAME`` blocks; each holds either one ``loop_`` table
(columns ``_rlnName`` followed by rows) or ``_rlnName value`` pairs. Values are kept as
strings here; :mod:`cryosgd.data.particles` gives them meaning and units.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from cryosgd.errors import InputError
from cryosgd.io.atomic import atomic_path


@dataclass
class StarBlock:
    """One ``data_`` block: column name (without the leading underscore) → values."""

    columns: dict[str, list[str]] = field(default_factory=dict)
    loop: bool = True

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))


def read_star(path: str | Path) -> dict[str, StarBlock]:
    """Parse a STAR file into ``{block name: StarBlock}`` (block names without ``data_``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")  # as for maps (cryosgd.io.mrc.open_mrc)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read STAR file ({err.__class__.__name__})") from None
    blocks: dict[str, StarBlock] = {}
    block: StarBlock | None = None
    names: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            block = blocks.setdefault(line[5:], StarBlock(loop=False))
            names = []
        elif block is None:
            raise InputError(path, f"line {number}: content before the first data_ block")
        elif line.startswith("loop_"):
            block.loop, names = True, []
        elif line.startswith("_"):
            words = line[1:].split(None, 1)
            if block.loop and not any(block.columns.values()):
                names.append(words[0])
                block.columns[words[0]] = []
            else:
                block.columns[words[0]] = [_split(words[1], path, number)[0] if len(words) > 1 else ""]
        elif block.loop:
            values = _split(line, path, number)
            if len(values) != len(names):
                raise InputError(path, f"line {number}: {len(values)} values for {len(names)} columns")
            for name, value in zip(names, values):
                block.columns[name].append(value)
        else:
            raise InputError(path, f"line {number}: value outside a loop_ or a _name pair")
    if not blocks:
        raise InputError(path, "no data_ block: not a STAR file")
    return blocks


def _split(line: str, path: Path, number: int) -> list[str]:
    if "'" not in line and '"' not in line:
        return line.split()
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        raise InputError(path, f"line {number}: unbalanced quotes") from None


def write_star(path: str | Path, blocks: dict[str, StarBlock]) -> None:
    """Write blocks as a RELION 3.1 STAR file, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as out:
            out.write("\n# version 30001\n")
            for name, block in blocks.items():
                out.write(f"\ndata_{name}\n\n")
                if block.loop:
                    _write_loop(out, block)
                else:
                    width = max(map(len, block.columns)) + 2
                    for key, values in block.columns.items():
                        out.write(f"_{key:<{width}}{_quote(values[0])}\n")
                out.write("\n")


def _write_loop(out, block: StarBlock) -> None:
    out.write("loop_\n")
    for i, key in enumerate(block.columns, start=1):
        out.write(f"_{key} #{i}\n")
    columns = [[_quote(v) for v in values] for values in block.columns.values()]
    for row in zip(*columns):
        out.write(" ".join(row) + "\n")


def _quote(value: str) -> str:
    if value == "" or any(c.isspace() for c in value):
        return '"' + value + '"'
    return value
