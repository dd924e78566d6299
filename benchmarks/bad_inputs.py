"""Bad and hostile input, command by command: does cryosgd keep its promise?

    python benchmarks/bad_inputs.py [--workdir DIR] [--markdown docs/reliability.md] [--jobs N]
                                    [--only TEXT] [--timeout S]

The promise (README): bad input stops with ONE line on stderr naming the file and the field
(or the option and the value), exit code 2, and nothing half-written; no Python traceback;
never an input or another run's output overwritten without --force; --resume only continues
a checkpoint of the same data and settings; a second run into a busy folder stops (a lock);
Ctrl-C prints one line saying how to continue (exit 130); outputs get the umask's permissions.

The script builds small valid inputs in a temporary folder (a 16³ map, `cryosgd simulate`
datasets, STAR files edited from them), then runs each case as a real subprocess
(`python -m cryosgd …`) in a folder of its own, with relative paths. For each case it records
the exit code, the first line of stderr, whether stderr had more lines or a traceback, and
what changed in the case's folder (file tree with sizes and mtimes before and after). Verdict:
OK when the exit code is the expected one (2 for bad input, 130 for Ctrl-C, 0 where the input
is legitimately accepted), stderr has at most one line and no traceback, the message names
what it should, and nothing changed that must not change; otherwise FAIL with the reason.

With --markdown, writes the table (and a paragraph on how it was made) to that file.
Exit status: 0 when every case is OK, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np

from cryosgd.io.mrc import write_map
from cryosgd.sim.phantom import blob_phantom

PY = sys.executable
LOCK = ".cryosgd.lock"
TIMEOUT = 180.0
CUDA = None  # set in main(): whether this torch build sees a GPU, and how many


# --------------------------------------------------------------------------------------------
# Running one command and looking at what it did
# --------------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` (symlinks not followed): kind, size and mtime of files."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, root)
            if stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir",)
            else:
                tree[rel] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return tree


def diff(before: dict, after: dict) -> list[str]:
    """What changed: '+new', '-gone', '~modified' (a lock file that already existed may be
    re-stamped by the run that takes the lock: that is not a change of data)."""
    out = []
    for rel in sorted(set(before) | set(after)):
        if rel not in before:
            out.append("+" + rel)
        elif rel not in after:
            out.append("-" + rel)
        elif before[rel] != after[rel] and os.path.basename(rel) != LOCK:
            out.append("~" + rel)
    return out


def _under(rel: str, prefixes) -> bool:
    return any(rel == p.rstrip("/") or rel.startswith(p.rstrip("/") + "/") for p in prefixes)


@dataclass
class Row:
    cls: str
    desc: str
    cmd: str
    code: int | None = None
    first: str = ""
    lines: int = 0
    traceback: bool = False
    changed: list[str] = field(default_factory=list)
    verdict: str = "OK"
    reason: str = ""
    seconds: float = 0.0
    stderr: str = ""
    stdout: str = ""


@dataclass
class Case:
    cls: str
    desc: str
    argv: list[str] = field(default_factory=list)      # after `cryosgd`
    setup: Callable[[Path], None] | None = None
    expect: tuple[int, ...] = (2,)
    may_change: tuple[str, ...] = ()                  # prefixes that may change (legitimate runs)
    protect: tuple[str, ...] = ()                     # ... except these
    names: tuple[str, ...] = ()                       # the message must contain each of these
    check: Callable[[Path, Row], str | None] | None = None
    runner: Callable[[Case, Path], list[Row]] | None = None
    umask: int | None = None
    timeout: float | None = None
    note: str = ""                                    # shown in the verdict of an OK row


def cmdline(argv) -> str:
    return "cryosgd " + shlex.join([str(a) for a in argv])


def run(argv, cwd: Path, timeout: float | None = None, umask: int | None = None):
    """Run ``python -m cryosgd ARGV`` in ``cwd``: (code or None on timeout, stdout, stderr, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen([PY, "-m", "cryosgd", *[str(a) for a in argv]], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, errors="replace",
                            start_new_session=True, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    try:
        out, err = proc.communicate(timeout=timeout or TIMEOUT)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return code, out, err, time.monotonic() - start


def judge(case: Case, row: Row, stdout: str, stderr: str, changes: list[str], folder: Path) -> Row:
    """Fill in the row's verdict from the exit code, stderr and the file changes."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    row.first, row.lines, row.stderr, row.stdout = (lines[0] if lines else ""), len(lines), stderr, stdout
    row.traceback = "Traceback" in stderr or "Traceback" in stdout
    row.changed = changes
    reasons = []
    if row.code == -signal.SIGINT and 130 in case.expect:
        row.code = 130  # killed by SIGINT: what a shell shows as 130
        row.reason = "killed by the signal (a shell shows exit 130)"
    if row.code is None:
        reasons.append(f"no answer within {case.timeout or TIMEOUT:.0f} s (killed)")
    elif row.code not in case.expect:
        want = " or ".join(str(c) for c in case.expect)
        reasons.append(f"exit {row.code}, expected {want}")
    if row.traceback:
        reasons.append("Python traceback")
    if row.lines > 1:
        reasons.append(f"stderr has {row.lines} lines")
    if row.code in (2, 130) and row.lines == 0:
        reasons.append("no message on stderr")
    if row.code == 2 and row.first:
        missing = [n for n in case.names if n not in row.first]
        if missing:
            reasons.append("message does not name " + ", ".join(repr(m) for m in missing))
    # a refused run (exit 2) may change nothing; an accepted or interrupted one only what it may
    may = row.code is not None and row.code != 2 and row.code in case.expect
    bad = [c for c in changes if not (may and _under(c[1:], case.may_change) and not _under(c[1:], case.protect))]
    if bad:
        reasons.append("changed: " + ", ".join(bad[:4]) + (" …" if len(bad) > 4 else ""))
    if row.code == 0:
        nonfinite = [c[1:] for c in changes if c[0] in "+~" and c.endswith((".mrc", ".mrcs"))
                     and _has_nonfinite(folder / c[1:])]
        if nonfinite:
            reasons.append("NaN or infinite values written to " + ", ".join(nonfinite[:3]))
    if case.check is not None and row.code is not None:
        extra = case.check(folder, row)
        if extra:
            reasons.append(extra)
    if reasons:
        row.verdict, row.reason = "FAIL", "; ".join(filter(None, [row.reason] + reasons))
    elif case.note:
        row.reason = "; ".join(filter(None, [row.reason, case.note]))
    return row


def _has_nonfinite(path: Path) -> bool:
    try:
        with warnings.catch_warnings(), mrcfile.open(path, permissive=True) as m:
            warnings.simplefilter("ignore")
            return m.data is not None and not np.isfinite(m.data).all()
    except (OSError, ValueError):
        return False


def run_plain(case: Case, folder: Path) -> list[Row]:
    before = snapshot(folder)
    row = Row(case.cls, case.desc, cmdline(case.argv))
    row.code, out, err, row.seconds = run(case.argv, folder, case.timeout, case.umask)
    return [judge(case, row, out, err, diff(before, snapshot(folder)), folder)]


# --------------------------------------------------------------------------------------------
# Inputs: maps, STAR files (edited as text, so that any hostile value can be written), stacks
# --------------------------------------------------------------------------------------------

BASE: Path = Path()  # the folder of shared valid inputs, made once


def put(*names: str) -> Callable[[Path], None]:
    """A setup that copies these items of BASE into the case's folder."""
    def setup(folder: Path) -> None:
        for name in names:
            src = BASE / name
            if src.is_dir():
                shutil.copytree(src, folder / name, symlinks=True)
            else:
                shutil.copy2(src, folder / name)
    return setup


def chain(*setups) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        for s in setups:
            s(folder)
    return setup


def mrc(path: Path, data, voxel: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns of the NaN we put in on purpose
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(np.asarray(data, dtype=np.float32))
            m.voxel_size = voxel


class Star:
    """A RELION STAR file as text blocks: {block: (columns, rows)}, rows as lists of strings."""

    def __init__(self, path: Path):
        self.blocks: dict[str, tuple[list[str], list[list[str]]]] = {}
        name = None
        for line in Path(path).read_text().splitlines():
            s = line.strip()
            if not s or s.startswith("#") or s == "loop_":
                continue
            if s.startswith("data_"):
                name = s[5:]
                self.blocks[name] = ([], [])
            elif s.startswith("_"):
                self.blocks[name][0].append(s.split()[0][1:])
            else:
                self.blocks[name][1].append(s.split())

    def cols(self, block):
        return self.blocks[block][0]

    def rows(self, block):
        return self.blocks[block][1]

    def set(self, block: str, column: str, value, rows=None) -> Star:
        cols, data = self.blocks[block]
        j = cols.index(column)
        for i, row in enumerate(data):
            if rows is None or i in rows:
                row[j] = value(i, row[j]) if callable(value) else str(value)
        return self

    def drop(self, block: str, column: str) -> Star:
        cols, data = self.blocks[block]
        j = cols.index(column)
        cols.pop(j)
        for row in data:
            row.pop(j)
        return self

    def keep(self, block: str, n: int) -> Star:
        del self.blocks[block][1][n:]
        return self

    def write(self, path: Path, version: bool = True) -> None:
        text = ["", "# version 30001", ""] if version else [""]
        for name, (cols, data) in self.blocks.items():
            text += [f"data_{name}", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
            text += [" ".join(r) for r in data] + ["", ""]
        Path(path).write_text("\n".join(text))

    def as_relion30(self, path: Path, pixel: bool = True, detector: str = "3.0", magnification: str = "10000") -> None:
        """The same particles as one STAR 3.0 block: optics per particle, origins in pixels."""
        (ocols, orows), (pcols, prows) = self.blocks["optics"], self.blocks["particles"]
        optics = dict(zip(ocols, orows[0]))
        px = float(optics["rlnImagePixelSize"])
        cols = [c for c in pcols if c != "rlnOpticsGroup"]
        cols = [{"rlnOriginXAngst": "rlnOriginX", "rlnOriginYAngst": "rlnOriginY"}.get(c, c) for c in cols]
        extra = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
        values = [optics[c] for c in extra]
        if pixel:
            extra += ["rlnDetectorPixelSize", "rlnMagnification"]
            values += [detector, magnification]
        rows = []
        for r in prows:
            d = dict(zip(pcols, r))
            d["rlnOriginX"] = f"{float(d.pop('rlnOriginXAngst')) / px:.6f}"
            d["rlnOriginY"] = f"{float(d.pop('rlnOriginYAngst')) / px:.6f}"
            rows.append([d[c] for c in cols] + values)
        lines = ["", "data_", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols + extra)]
        Path(path).write_text("\n".join(lines + [" ".join(r) for r in rows] + ["", ""]))


def put_map(rel: str, voxel_A: float, nan: bool = False, noise_seed: int | None = None):
    """A setup: a 16³ phantom at ``rel`` with this voxel size (and one NaN voxel; or white noise
    of the phantom's standard deviation drawn with ``noise_seed``: a half map)."""
    def setup(folder: Path) -> None:
        data = blob_phantom(16)
        if nan:
            data[8, 8, 8] = np.nan
        if noise_seed is not None:
            data = data + data.std() * np.random.default_rng(noise_seed).normal(size=data.shape)
        mrc(folder / rel, data, voxel_A)
    return setup


def star_edit(edit: Callable[[Star], None], name: str = "edited.star", version: bool = True):
    """A setup: copy sim/ and write sim/NAME, sim/particles.star edited by ``edit``."""
    def setup(folder: Path) -> None:
        put("sim")(folder)
        star = Star(folder / "sim" / "particles.star")
        edit(star)
        star.write(folder / "sim" / name, version)
    return setup


def star30(name="v30.star", **kwargs):
    def setup(folder: Path) -> None:
        put("sim")(folder)
        Star(folder / "sim" / "particles.star").as_relion30(folder / "sim" / name, **kwargs)
    return setup


def stack_of_box(box: int):
    """A setup: odd.mrcs with 3 images of ``box`` px, and odd.star pointing at them."""
    def setup(folder: Path) -> None:
        put("sim")(folder)
        mrc(folder / "sim" / "odd.mrcs", np.random.default_rng(0).normal(size=(3, box, box)), 3.0)
        star = Star(folder / "sim" / "particles.star").keep("particles", 3)
        star.set("optics", "rlnImageSize", box)
        star.set("particles", "rlnImageName", lambda i, v: f"{i + 1:06d}@odd.mrcs")
        star.set("particles", "rlnRandomSubset", lambda i, v: str(1 + i % 2))
        star.write(folder / "sim" / "odd.star")
    return setup


def write_file(rel: str, content: str | bytes = "precious"):
    def setup(folder: Path) -> None:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return setup


def mkdir(rel: str):
    return lambda folder: (folder / rel).mkdir(parents=True, exist_ok=True)


def cli(*argv, ok=(0,)):
    """A setup step that runs cryosgd (it must succeed)."""
    def setup(folder: Path) -> None:
        code, out, err, _ = run(argv, folder)
        if code not in ok:
            raise RuntimeError(f"setup `{cmdline(argv)}` in {folder}: exit {code}\n{out}\n{err}")
    return setup


def pause(seconds=0.02):
    """So that a later write gets another mtime than the setup's own files."""
    return lambda folder: time.sleep(seconds)


# Extra checks --------------------------------------------------------------------------------

def unchanged_bytes(rel: str, source: str):
    """The file ``rel`` still has the bytes of BASE/``source``."""
    def check(folder: Path, row: Row):
        if (folder / rel).read_bytes() != (BASE / source).read_bytes():
            return f"{rel} no longer holds its data"
    return check


def exists(*rels):
    def check(folder: Path, row: Row):
        missing = [r for r in rels if not (folder / r).exists()]
        if missing and row.code == 0:
            return "exit 0 but missing " + ", ".join(missing)
    return check


def modes(folder_rel: str, file_mode: int, dir_mode: int | None = None):
    def check(folder: Path, row: Row):
        if row.code != 0:
            return None
        out = folder / folder_rel
        files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]
        if out.is_file():
            files += [p for p in out.parent.glob(out.stem + ".*") if p.is_file() and p != out]
        wrong = {p.relative_to(folder).as_posix(): oct(p.stat().st_mode & 0o777) for p in files
                 if p.stat().st_mode & 0o777 != file_mode}
        if dir_mode is not None and out.is_dir() and out.stat().st_mode & 0o777 != dir_mode:
            wrong[folder_rel + "/"] = oct(out.stat().st_mode & 0o777)
        if wrong:
            return "modes " + ", ".join(f"{k} {v}" for k, v in sorted(wrong.items())) + f", expected {oct(file_mode)}"
    return check


def no_bool_in_help(folder: Path, row: Row):
    text = row.stdout
    if "<bool>" in text:
        return "help shows an option taking <bool>"
    if row.code == 0 and "usage:" not in text:
        return "no usage on stdout"


def run_help(case: Case, folder: Path) -> list[Row]:
    before = snapshot(folder)
    row = Row(case.cls, case.desc, cmdline(case.argv))
    row.code, out, err, row.seconds = run(case.argv, folder, case.timeout)
    row.stdout = out
    return [judge(case, row, out, err, diff(before, snapshot(folder)), folder)]


def partial_files(folder: Path, rel: str) -> list[str]:
    base = folder / rel
    if not base.exists():
        return []
    return [p.relative_to(folder).as_posix() for p in base.rglob("*")
            if p.name.endswith(".tmp") or (p.name.startswith(".") and p.name != LOCK)]


# --------------------------------------------------------------------------------------------
# Runners for cases that need a process running in the background
# --------------------------------------------------------------------------------------------

def _start(argv, folder: Path, tag: str = ""):
    log_out = open(folder / ".." / f"{folder.name}{tag}.stdout", "w")
    log_err = open(folder / ".." / f"{folder.name}{tag}.stderr", "w")
    proc = subprocess.Popen([PY, "-m", "cryosgd", *map(str, argv)], cwd=folder, stdout=log_out, stderr=log_err,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, (log_out, log_err)


def _logs(folder: Path, files, tag: str = ""):
    for f in files:
        f.close()
    return ((folder / ".." / f"{folder.name}{tag}.stdout").read_text(errors="replace"),
            (folder / ".." / f"{folder.name}{tag}.stderr").read_text(errors="replace"))


def _wait_for(predicate, proc, limit: float) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.02)
    return False


def run_interrupt(case: Case, folder: Path, *, ready: Callable[[Path], bool], allowed_rel: str,
                  continue_check: bool | tuple[str, ...], double: bool = False) -> list[Row]:
    """Start the command, send SIGINT (Ctrl-C: the whole process group) once ``ready``, and
    judge the answer; optionally run the continue command the message printed."""
    before = snapshot(folder)
    row = Row(case.cls, case.desc, cmdline(case.argv) + "  # then Ctrl-C" + (" twice" if double else ""))
    start = time.monotonic()
    proc, files = _start(case.argv, folder)
    was_ready = _wait_for(lambda: ready(folder), proc, 120)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        if double:
            time.sleep(0.05)
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    try:
        row.code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        row.code = None
    row.seconds = time.monotonic() - start
    out, err = _logs(folder, files)
    changes = diff(before, snapshot(folder))
    judged = judge(case, row, out, err, changes, folder)
    extra = []
    if not was_ready:
        extra.append("the run ended (or never got ready) before Ctrl-C could be sent")
    leftovers = partial_files(folder, allowed_rel)
    if leftovers:
        extra.append("partial files left: " + ", ".join(leftovers))
    if extra:
        judged.verdict = "FAIL"
        judged.reason = "; ".join(filter(None, [judged.reason] + extra))
    rows = [judged]
    if continue_check:
        m = re.search(r"continue with: (cryosgd .*)$", judged.first)
        if m:
            argv, desc = shlex.split(m.group(1))[1:], "then the continue command that Ctrl-C printed"
        elif "run the command again" in judged.first:
            argv, desc = case.argv, "then the same command again, as Ctrl-C said"
        else:
            rows.append(Row(case.cls, "then the command that Ctrl-C printed", "(none printed)", verdict="FAIL",
                            reason="Ctrl-C printed no command to continue"))
            return rows
        follow = Row(case.cls, desc, cmdline(argv))
        before = snapshot(folder)
        follow.code, out, err, follow.seconds = run(argv, folder, 300)
        cont = Case(case.cls, desc, argv, expect=(0,), may_change=(allowed_rel,),
                    check=exists(*continue_check) if isinstance(continue_check, tuple) else None)
        rows.append(judge(cont, follow, out, err, diff(before, snapshot(folder)), folder))
    return rows


def run_interrupt_sweep(case: Case, folder: Path, *, trigger: str, delays: list[float]) -> list[Row]:
    """Ctrl-C at several moments (``delays`` seconds after ``trigger`` appears), a fresh run
    each time: one row, FAIL if any moment gives a wrong answer (an interrupt can land in an
    import, a write, a plot...)."""
    row = Row(case.cls, case.desc, cmdline(case.argv) + "  # then Ctrl-C at " +
              ", ".join(f"{d:g}" for d in delays) + f" s after {trigger} appears")
    answers, failures, start = [], [], time.monotonic()
    for k, delay in enumerate(delays):
        shutil.rmtree(folder / "out", ignore_errors=True)
        before = snapshot(folder)
        proc, files = _start(case.argv, folder, f".try{k}")
        _wait_for(lambda: (folder / trigger).exists(), proc, 120)
        t_ready = time.monotonic()
        time.sleep(delay)
        sent = proc.poll() is None
        if sent:
            os.killpg(proc.pid, signal.SIGINT)
        sent_after = time.monotonic() - t_ready
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        out, err = _logs(folder, files, f".try{k}")
        if not sent:
            failures.append(f"at +{delay:g} s: the run had ended before Ctrl-C (exit {code})")
            continue
        one = judge(case, Row(case.cls, case.desc, row.cmd, code=code), out, err, diff(before, snapshot(folder)), folder)
        leftovers = partial_files(folder, "out")
        if leftovers:
            one.verdict, one.reason = "FAIL", "; ".join(filter(None, [one.reason, "partial files left: " +
                                                                       ", ".join(leftovers)]))
        answers.append(one)
        if one.verdict == "FAIL":
            tail = [l for l in err.strip().splitlines() if l.strip()][-1:] or [""]
            failures.append(f"at +{delay:g} s (sent +{sent_after:.2f} s): {one.reason} (last stderr line: {tail[0]})")
    row.seconds = time.monotonic() - start
    if not answers:
        row.verdict, row.reason = "FAIL", " / ".join(failures)
        return [row]
    worst = next((a for a in answers if a.verdict == "FAIL"), answers[0])
    row.code, row.first, row.lines, row.traceback = worst.code, worst.first, worst.lines, worst.traceback
    codes = sorted({str(a.code) for a in answers})
    if failures:
        row.verdict, row.reason = "FAIL", f"{len(failures)} of {len(delays)} moments: " + " / ".join(failures)
    else:
        row.reason = f"{len(delays)} moments, exit {', '.join(codes)}"
    return [row]


def run_concurrent(case: Case, folder: Path) -> list[Row]:
    """A long reconstruct into out/ (held until killed), and second runs into out/ meanwhile."""
    rows = []
    long_argv = ["reconstruct", "big/particles.star", "-o", "out", "--epochs", "5000", "--method", "pcg"]
    proc, files = _start(long_argv, folder)
    try:
        ready = _wait_for(lambda: (folder / "out" / LOCK).exists() and (folder / "out" / "run.json").exists(),
                          proc, 120)
        if not ready or proc.poll() is not None:
            out, err = _logs(folder, files)
            files = ()
            row = Row(case.cls, "first run (holds the folder)", cmdline(long_argv))
            row.code, row.verdict = proc.poll(), "FAIL"
            row.reason = "the first run did not start or ended early: " + (err.strip().splitlines() or [""])[-1]
            return [row]
        time.sleep(0.5)
        seconds = [
            ("second reconstruct into the folder of a running reconstruct",
             ["reconstruct", "big/particles.star", "-o", "out", "--epochs", "1"]),
            ("second reconstruct with --force into a running one's folder",
             ["reconstruct", "big/particles.star", "-o", "out", "--epochs", "1", "--force"]),
            ("second reconstruct with --resume into a running one's folder",
             ["reconstruct", "big/particles.star", "-o", "out", "--epochs", "5000", "--method", "pcg", "--resume"]),
            ("simulate into the folder of a running reconstruct",
             ["simulate", "big/ground_truth.mrc", "-o", "out", "-n", "10"]),
            ("hessian into the folder of a running reconstruct",
             ["hessian", "big/particles.star", "-o", "out", "--lanczos-iterations", "0"]),
        ]
        for desc, argv in seconds:
            sub = Case(case.cls, desc, argv, names=("another cryosgd run", "out"))
            row = Row(case.cls, desc, cmdline(argv))
            inside = {p.name for p in (folder / "out").iterdir()}
            row.code, out, err, row.seconds = run(argv, folder, 120)
            judged = judge(sub, row, out, err, [], folder)
            # the first run writes into out/ meanwhile: check instead that the second run
            # left none of its own files there and did not remove the folder
            if not (folder / "out").is_dir():
                judged.verdict, judged.reason = "FAIL", (judged.reason + "; " if judged.reason else "") + \
                    "the output folder of the running process was removed"
            elif proc.poll() is not None:
                judged.verdict, judged.reason = "FAIL", (judged.reason + "; " if judged.reason else "") + \
                    "the first run ended meanwhile: the lock was not tested"
            else:
                new = {p.name for p in (folder / "out").iterdir()} - inside
                foreign = new & {"particles.star", "particles.mrcs", "ground_truth.mrc", "hessian_diagonal.mrc",
                                 "kappa.csv", "radial_profile.csv"}
                if foreign:
                    judged.verdict, judged.reason = "FAIL", (judged.reason + "; " if judged.reason else "") + \
                        "the second run wrote " + ", ".join(sorted(foreign))
            rows.append(judged)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if files:
            _logs(folder, files)
    argv = ["reconstruct", "big/particles.star", "-o", "out", "--epochs", "0", "--force"]
    after = Case(case.cls, "a new run after the first was killed (kill -9): the lock is released", argv,
                 expect=(0,), may_change=("out",), check=exists("out/map.mrc"))
    rows += run_plain(after, folder)
    return rows


def run_readonly(case: Case, folder: Path) -> list[Row]:
    """An unwritable output folder. Root may write anywhere, so as root the folder is a
    read-only bind mount of an empty folder (when `mount` works here)."""
    target = folder / "locked"
    target.mkdir()
    mounted = False
    if os.geteuid() == 0:
        (folder / "src").mkdir()
        r1 = subprocess.run(["mount", "--bind", str(folder / "src"), str(target)], capture_output=True)
        r2 = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True) \
            if r1.returncode == 0 else r1
        mounted = r1.returncode == 0 and r2.returncode == 0
        if not mounted:
            if r1.returncode == 0:
                subprocess.run(["umount", str(target)], capture_output=True)
            row = Row(case.cls, case.desc, cmdline(case.argv), verdict="SKIP",
                      reason="running as root and `mount --bind -o ro` does not work here: root can write anywhere")
            return [row]
    else:
        target.chmod(0o555)
    try:
        rows = run_plain(case, folder)
        note = "read-only bind mount (root)" if mounted else "chmod 555"
        rows[0].desc += f" ({note})"
        return rows
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], capture_output=True)
        else:
            target.chmod(0o755)


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------

def cases() -> list[Case]:
    C = []

    def add(cls, desc, argv, setup=None, **kw):
        C.append(Case(cls, desc, list(argv), setup, **kw))

    SIM = put("truth.mrc", "sim")
    stack_kept = unchanged_bytes("sim/particles.mrcs", "sim/particles.mrcs")
    recon = ("reconstruct", "sim/particles.star")

    # ---- data loss ---------------------------------------------------------------------
    D = "data loss"
    add(D, "project -o X.star (a STAR name for the stack)", ["project", "truth.mrc", "sim/particles.star", "-o", "X.star"],
        SIM, names=("X.star",))
    add(D, "project -o the input particle stack (particles.mrcs beside the input STAR)",
        ["project", "sim/ground_truth.mrc", "sim/particles.star", "-o", "sim/particles.mrcs"], SIM,
        names=("particles.mrcs",), check=stack_kept)
    add(D, "project -o the input particle stack, with --force",
        ["project", "sim/ground_truth.mrc", "sim/particles.star", "-o", "sim/particles.mrcs", "--force"], SIM,
        names=("particles.mrcs",), check=stack_kept)
    add(D, "project -o the input map", ["project", "truth.mrc", "sim/particles.star", "-o", "truth.mrc", "--force"], SIM,
        names=("truth.mrc",))
    add(D, "project -o the input map, which is named map.mrcs",
        ["project", "map.mrcs", "sim/particles.star", "-o", "map.mrcs", "--force"],
        chain(SIM, lambda f: shutil.copy2(f / "truth.mrc", f / "map.mrcs")), names=("map.mrcs",))

    def pstar(f: Path):
        star = Star(f / "sim" / "particles.star")
        star.set("particles", "rlnImageName", lambda i, v: v.replace("@", "@sim/"))
        star.write(f / "p.star")
    add(D, "project: the OUT.star beside -o p.mrcs would be the input STAR p.star",
        ["project", "truth.mrc", "p.star", "-o", "p.mrcs"], chain(SIM, pstar), names=("p.star",))
    add(D, "project: OUT.star would be the input STAR, with --force",
        ["project", "truth.mrc", "p.star", "-o", "p.mrcs", "--force"], chain(SIM, pstar), names=("p.star",))
    add(D, "project -o a symlink to the input stack, with --force (the stack must survive)",
        ["project", "truth.mrc", "sim/particles.star", "-o", "link.mrcs", "--force"],
        chain(SIM, lambda f: os.symlink("sim/particles.mrcs", f / "link.mrcs")), expect=(2, 0),
        may_change=("link.mrcs", "link.star"), check=stack_kept)
    add(D, "project -o a symlink into the dataset folder (new name), with --force: stack survives",
        ["project", "truth.mrc", "sim/particles.star", "-o", "proj.mrcs", "--force"],
        chain(SIM, lambda f: os.symlink("sim", f / "alias"), lambda f: os.symlink("alias/particles.mrcs",
                                                                                 f / "proj.mrcs")),
        expect=(2, 0), may_change=("proj.mrcs", "proj.star"), check=stack_kept)
    add(D, "simulate into its own input's folder, the input named ground_truth.mrc",
        ["simulate", "sim/ground_truth.mrc", "-o", "sim", "-n", "10"], SIM, names=("ground_truth.mrc",))
    add(D, "simulate into its own input's folder (input ground_truth.mrc), with --force",
        ["simulate", "sim/ground_truth.mrc", "-o", "sim", "-n", "10", "--force"], SIM, names=("ground_truth.mrc",))
    add(D, "simulate -o out --poses out/particles.star (the poses file is an output of out's earlier run)",
        ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--poses", "out/particles.star"],
        chain(SIM, cli("simulate", "truth.mrc", "-o", "out", "-n", "10")), names=("particles.star",))
    add(D, "simulate -o out: out holds a foreign particles.star",
        ["simulate", "truth.mrc", "-o", "out", "-n", "10"], chain(SIM, write_file("out/particles.star")),
        names=("particles.star", "--force"))
    add(D, "simulate -o out: out holds a foreign particles.star, with --force (replaced)",
        ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--force"], chain(SIM, write_file("out/particles.star")),
        expect=(0,), may_change=("out",), check=exists("out/particles.star", "out/particles.mrcs"))
    add(D, "simulate --force over a hard link to another dataset's stack (the other dataset survives)",
        ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--force"],
        chain(SIM, mkdir("out"), lambda f: os.link(f / "sim/particles.mrcs", f / "out/particles.mrcs")),
        expect=(0, 2), may_change=("out",), check=stack_kept)
    add(D, "reconstruct -o out: out holds a foreign map.mrc", [*recon, "-o", "out", "--epochs", "0"],
        chain(SIM, write_file("out/map.mrc")), names=("map.mrc",))
    add(D, "hessian -o out: out holds a foreign kappa.csv", ["hessian", "sim/particles.star", "-o", "out"],
        chain(SIM, write_file("out/kappa.csv")), names=("kappa.csv",))
    add(D, "demo -o out: out holds a foreign map.mrc", ["demo", "-o", "out", "-n", "200"], write_file("out/map.mrc"),
        names=("map.mrc",), timeout=60)
    add(D, "project -o p.mrcs: a foreign p.star exists beside it", ["project", "truth.mrc", "sim/particles.star",
                                                                      "-o", "p.mrcs"],
        chain(SIM, write_file("p.star")), names=("p.star",))
    add(D, "project rerun without --force (p.mrcs exists)", ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs"],
        chain(SIM, cli("project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs")), names=("p.mrcs", "--force"))
    add(D, "project rerun with --force", ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs", "--force"],
        chain(SIM, cli("project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs"), pause()), expect=(0,),
        may_change=("p.mrcs", "p.star"))
    add(D, "simulate rerun into its own earlier run's folder (run.json): reused",
        ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--seed", "3"],
        chain(SIM, cli("simulate", "truth.mrc", "-o", "out", "-n", "10"), pause()), expect=(0,), may_change=("out",))
    add(D, "reconstruct rerun into its own earlier run's folder: reused",
        [*recon, "-o", "r", "--epochs", "0"], chain(SIM, cli(*recon, "-o", "r", "--epochs", "0"), pause()),
        expect=(0,), may_change=("r",))
    add(D, "hessian rerun into its own earlier run's folder: reused",
        ["hessian", "sim/particles.star", "-o", "h", "--lanczos-iterations", "0"],
        chain(SIM, cli("hessian", "sim/particles.star", "-o", "h", "--lanczos-iterations", "0"), pause()),
        expect=(0,), may_change=("h",))
    add(D, "reconstruct -o the dataset's own folder sim/ (the data must survive)",
        [*recon, "-o", "sim", "--epochs", "0"], SIM, expect=(0, 2), may_change=("sim",),
        protect=("sim/particles.star", "sim/particles.mrcs", "sim/ground_truth.mrc"))
    add(D, "simulate into a reconstruct run's folder (the maps must survive)",
        ["simulate", "truth.mrc", "-o", "r", "-n", "10"], chain(SIM, cli(*recon, "-o", "r", "--epochs", "0")),
        expect=(0, 2), may_change=("r",), protect=("r/map.mrc", "r/half1.mrc", "r/half2.mrc", "r/checkpoint.pt"))
    add(D, "simulate into a dataset folder that a reconstruct run reused (run.json says reconstruct)",
        ["simulate", "truth.mrc", "-o", "sim", "-n", "10"], chain(SIM, cli(*recon, "-o", "sim", "--epochs", "0")),
        names=("sim",), check=stack_kept)
    add(D, "reconstruct -o the input STAR file itself", [*recon, "-o", "sim/particles.star"], SIM,
        names=("particles.star",))
    add(D, "simulate -o the input map file itself", ["simulate", "truth.mrc", "-o", "truth.mrc", "-n", "10"], SIM,
        names=("truth.mrc",))
    add(D, "fsc writes no file", ["fsc", "sim/ground_truth.mrc", "truth.mrc"], SIM, expect=(0,))

    # ---- physical values: the STAR file --------------------------------------------------
    V = "values"
    ed = "sim/edited.star"
    add(V, "STAR rlnImagePixelSize -1.5 (reconstruct)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("optics", "rlnImagePixelSize", "-1.5")), names=("edited.star", "rlnImagePixelSize"))
    add(V, "STAR rlnImagePixelSize 0 (reconstruct)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("optics", "rlnImagePixelSize", "0")), names=("edited.star", "rlnImagePixelSize"))
    add(V, "STAR rlnImagePixelSize 0 (hessian)", ["hessian", ed, "-o", "out"],
        star_edit(lambda s: s.set("optics", "rlnImagePixelSize", "0")), names=("edited.star", "rlnImagePixelSize"))
    add(V, "STAR rlnImagePixelSize -1.5 (project)", ["project", "sim/ground_truth.mrc", ed, "-o", "p.mrcs"],
        star_edit(lambda s: s.set("optics", "rlnImagePixelSize", "-1.5")), names=("edited.star", "rlnImagePixelSize"))
    add(V, "STAR rlnImagePixelSize nan", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("optics", "rlnImagePixelSize", "nan")), names=("edited.star", "rlnImagePixelSize"))
    add(V, "STAR 3.0: rlnDetectorPixelSize 0", ["reconstruct", "sim/v30.star", "-o", "out"], star30(detector="0"),
        names=("v30.star", "rlnDetectorPixelSize"))
    add(V, "STAR 3.0: rlnMagnification 0", ["reconstruct", "sim/v30.star", "-o", "out"], star30(magnification="0"),
        names=("v30.star", "rlnMagnification"))
    add(V, "STAR 3.0: rlnMagnification -10000 (hessian)", ["hessian", "sim/v30.star", "-o", "out"],
        star30(magnification="-10000"), names=("v30.star",))
    add(V, "STAR 3.0 without a pixel size and no --pixel-size", ["reconstruct", "sim/v30.star", "-o", "out"],
        star30(pixel=False), names=("v30.star", "rlnDetectorPixelSize"))
    add(V, "STAR 3.0 without a pixel size, --pixel-size 3: accepted",
        ["reconstruct", "sim/v30.star", "-o", "out", "--pixel-size", "3", "--epochs", "0"], star30(pixel=False),
        expect=(0,), may_change=("out",), check=exists("out/map.mrc"))
    add(V, "STAR 3.0 with a valid pixel size: accepted", ["reconstruct", "sim/v30.star", "-o", "out", "--epochs", "0"],
        star30(), expect=(0,), may_change=("out",), check=exists("out/map.mrc"))
    add(V, "--pixel-size 2 contradicts the STAR's rlnImagePixelSize 3",
        [*recon, "-o", "out", "--pixel-size", "2", "--epochs", "0"], SIM, names=("--pixel-size",))
    add(V, "empty particle table (header only, reconstruct)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.keep("particles", 0)), names=("edited.star",))
    add(V, "empty particle table (hessian)", ["hessian", ed, "-o", "out"],
        star_edit(lambda s: s.keep("particles", 0)), names=("edited.star",))
    add(V, "empty particle table (project)", ["project", "sim/ground_truth.mrc", ed, "-o", "p.mrcs"],
        star_edit(lambda s: s.keep("particles", 0)), names=("edited.star",))
    add(V, "STAR with an empty data_optics (no rows)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.keep("optics", 0)), names=("edited.star",))
    add(V, "rlnOpticsGroup 2, absent from data_optics", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnOpticsGroup", "2", rows={5})), names=("edited.star",))
    add(V, "NaN in rlnAngleRot (reconstruct)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnAngleRot", "nan", rows={3})), names=("edited.star", "rlnAngleRot"))
    add(V, "NaN in rlnDefocusU (project)", ["project", "sim/ground_truth.mrc", ed, "-o", "p.mrcs"],
        star_edit(lambda s: s.set("particles", "rlnDefocusU", "nan", rows={0})), names=("edited.star", "rlnDefocusU"))
    add(V, "inf in rlnOriginXAngst (hessian)", ["hessian", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnOriginXAngst", "inf", rows={7})),
        names=("edited.star", "rlnOriginXAngst"))
    add(V, "non-numeric rlnDefocusU ('abc')", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnDefocusU", "abc", rows={2})), names=("edited.star", "rlnDefocusU"))
    add(V, "a row with a missing value (13 of 14 columns)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.rows("particles")[4].pop()), names=("edited.star",))
    add(V, "rlnRandomSubset 3", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnRandomSubset", "3", rows={1})), names=("edited.star", "rlnRandomSubset"))
    add(V, "rlnRandomSubset all 1 (no second half)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnRandomSubset", "1")), names=("edited.star", "rlnRandomSubset"))
    add(V, "rlnRandomSubset 0", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnRandomSubset", "0", rows={0})), names=("edited.star",))
    add(V, "missing rlnImageName (reconstruct)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.drop("particles", "rlnImageName")), names=("edited.star", "rlnImageName"))
    add(V, "missing rlnAngleTilt (reconstruct)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.drop("particles", "rlnAngleTilt")), names=("edited.star", "rlnAngleTilt"))
    add(V, "missing rlnDefocusU (project, with CTF)", ["project", "sim/ground_truth.mrc", ed, "-o", "p.mrcs"],
        star_edit(lambda s: s.drop("particles", "rlnDefocusU")), names=("edited.star", "rlnDefocusU"))
    add(V, "rlnVoltage 0", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("optics", "rlnVoltage", "0")), names=("edited.star", "rlnVoltage"))
    add(V, "rlnAmplitudeContrast 1.5 (project)", ["project", "sim/ground_truth.mrc", ed, "-o", "p.mrcs"],
        star_edit(lambda s: s.set("optics", "rlnAmplitudeContrast", "1.5")), names=("edited.star", "rlnAmplitudeContrast"))
    add(V, "rlnImageSize 32 in data_optics, but the stack's images are 16 px", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("optics", "rlnImageSize", "32")), names=("edited.star",), expect=(0, 2),
        may_change=("out",), note="the stack's own box is used; the map is the same as with the right value")
    add(V, "image index past the end of the stack (61 of 60)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnImageName", "000061@particles.mrcs", rows={10})),
        names=("particles.mrcs",))
    add(V, "image index 0 (indices start at 1)", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnImageName", "000000@particles.mrcs", rows={0})),
        names=("edited.star",))
    add(V, "image index 'x@particles.mrcs'", ["reconstruct", ed, "-o", "out"],
        star_edit(lambda s: s.set("particles", "rlnImageName", "x@particles.mrcs", rows={0})),
        names=("edited.star",))

    def truncate(f: Path):
        data = (f / "sim/particles.mrcs").read_bytes()
        (f / "sim/particles.mrcs").write_bytes(data[: len(data) // 2])
    add(V, "a truncated stack file (half of its bytes)", [*recon, "-o", "out"], chain(SIM, truncate),
        names=("particles.mrcs",))
    add(V, "a stack that is not MRC (text)", [*recon, "-o", "out"],
        chain(SIM, write_file("sim/particles.mrcs", "this is not an MRC file\n" * 100)), names=("particles.mrcs",))
    add(V, "a stack file that is missing", [*recon, "-o", "out"],
        chain(SIM, lambda f: (f / "sim/particles.mrcs").unlink()), names=("particles.mrcs",))
    add(V, "a stack path that is a folder", [*recon, "-o", "out"],
        chain(SIM, lambda f: (f / "sim/particles.mrcs").unlink(), mkdir("sim/particles.mrcs")),
        names=("particles.mrcs",))
    add(V, "a stack with NaN pixels", [*recon, "-o", "out"],
        chain(SIM, lambda f: _nan_stack(f / "sim/particles.mrcs")), names=("particles.mrcs",))
    add(V, "STAR file of 0 bytes", ["reconstruct", "empty.star", "-o", "out"], write_file("empty.star", ""),
        names=("empty.star",))
    add(V, "STAR file of binary garbage", ["reconstruct", "junk.star", "-o", "out"],
        write_file("junk.star", bytes(range(256)) * 8), names=("junk.star",))
    add(V, "STAR file that does not exist", ["reconstruct", "nothere.star", "-o", "out"], None, names=("nothere.star",))
    add(V, "STAR path that is a folder", ["reconstruct", "sim", "-o", "out"], SIM, names=("sim",))
    add(V, "an MRC map given as the STAR file", ["reconstruct", "truth.mrc", "-o", "out"], SIM, names=("truth.mrc",))
    add(V, "images of odd box 33 (reconstruct)", ["reconstruct", "sim/odd.star", "-o", "out"], stack_of_box(33),
        names=("odd.mrcs",))
    add(V, "images of odd box 33 (hessian)", ["hessian", "sim/odd.star", "-o", "out"], stack_of_box(33),
        names=("odd",))
    add(V, "images of box 2 (reconstruct)", ["reconstruct", "sim/odd.star", "-o", "out"], stack_of_box(2),
        names=("odd.mrcs",))

    # ---- physical values: options --------------------------------------------------------
    for value in ("0", "-1", "nan", "abc", "inf"):
        add(V, f"reconstruct --pixel-size {value} (a STAR 3.0 without pixel size)",
            ["reconstruct", "sim/v30.star", "-o", "out", "--pixel-size", value], star30(pixel=False),
            names=("--pixel-size",))
    add(V, "reconstruct --pixel-size inf (a STAR 3.1 with pixel size)", [*recon, "-o", "out", "--pixel-size", "inf"],
        SIM, names=("--pixel-size",))
    add(V, "hessian --pixel-size 0", ["hessian", "sim/particles.star", "-o", "out", "--pixel-size", "0"], SIM,
        names=("--pixel-size",))
    add(V, "simulate (atomic model) --pixel-size nan", ["simulate", "model.pdb", "-o", "out", "--box", "16",
                                                        "--pixel-size", "nan", "-n", "10"], put("model.pdb"),
        names=("--pixel-size",))
    add(V, "simulate (atomic model) --pixel-size -1", ["simulate", "model.pdb", "-o", "out", "--box", "16",
                                                       "--pixel-size", "-1", "-n", "10"], put("model.pdb"),
        names=("--pixel-size",))
    add(V, "simulate (atomic model) without --box", ["simulate", "model.pdb", "-o", "out", "--pixel-size", "1",
                                                     "-n", "10"], put("model.pdb"), expect=(0, 2), may_change=("out",),
        note="accepted or refused, either is fine")
    for box in ("0", "2", "33"):
        add(V, f"simulate (atomic model) --box {box}", ["simulate", "model.pdb", "-o", "out", "--box", box,
                                                        "--pixel-size", "1", "-n", "10"], put("model.pdb"),
            names=("--box",))
    add(V, "simulate from a 16 px map with --box 32 (the option is for atomic models)",
        ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--box", "32"], SIM, names=("--box",))
    add(V, "simulate from a 3 Å map with --pixel-size 1 (the option is for atomic models)",
        ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--pixel-size", "1"], SIM, names=("--pixel-size",))
    for box in ("0", "2", "33", "1000"):
        add(V, f"reconstruct --box {box} (images are 16 px)", [*recon, "-o", "out", "--box", box], SIM,
            names=("--box",))
    add(V, "hessian --box 1000 (images are 16 px)", ["hessian", "sim/particles.star", "-o", "out", "--box", "1000"],
        SIM, names=("--box",))
    add(V, "hessian --box 33", ["hessian", "sim/particles.star", "-o", "out", "--box", "33"], SIM, names=("--box",))
    for n in ("0", "-5", "1e12", "1000000000000", "abc"):
        add(V, f"simulate -n {n}", ["simulate", "truth.mrc", "-o", "out", "-n", n], SIM, names=("-n",))
    for n in ("0", "-5"):
        add(V, f"demo -n {n}", ["demo", "-o", "out", "-n", n], None, names=("-n",))
    for snr in ("0", "-1", "nan"):
        add(V, f"simulate --snr {snr}", ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--snr", snr], SIM,
            names=("--snr",))
    add(V, "simulate --defocus-min 20000 --defocus-max 5000", ["simulate", "truth.mrc", "-o", "out", "-n", "10",
                                                               "--defocus-min", "20000", "--defocus-max", "5000"],
        SIM, names=("--defocus",))
    add(V, "simulate --defocus-min -5000 (negative defocus)", ["simulate", "truth.mrc", "-o", "out", "-n", "10",
                                                                "--defocus-min", "-5000"], SIM, names=("--defocus-min",))
    add(V, "simulate --astigmatism 1e9 (defocus V would be negative)",
        ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--astigmatism", "1e9"], SIM, names=("--astigmatism",))
    add(V, "simulate --astigmatism -100", ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--astigmatism", "-100"],
        SIM, names=("--astigmatism",))
    add(V, "simulate --shift-sigma -1", ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--shift-sigma", "-1"],
        SIM, names=("--shift-sigma",))
    add(V, "simulate --bfactor nan", ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--bfactor", "nan"],
        SIM, names=("--bfactor",))
    add(V, "simulate --seed -1", ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--seed", "-1"], SIM,
        expect=(0, 2), may_change=("out",), note="accepted or refused, either is fine")
    add(V, "demo --seed -1", ["demo", "-o", "out", "-n", "100", "--seed", "-1"], None, expect=(0, 2),
        may_change=("out",), note="accepted or refused, either is fine", timeout=120)
    add(V, "reconstruct --seed -1", [*recon, "-o", "out", "--seed", "-1", "--epochs", "0"], SIM, expect=(0, 2),
        may_change=("out",), note="accepted or refused, either is fine")
    for option in ("--bfactor", "--defocus-max", "--shift-sigma"):
        add(V, f"simulate {option} inf", ["simulate", "truth.mrc", "-o", "out", "-n", "10", option, "inf"], SIM,
            names=(option,))
    add(V, "simulate --snr inf (noise-free images)", ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--snr", "inf"],
        SIM, expect=(0, 2), may_change=("out",), note="noise-free images, or refused: either is fine")
    add(V, "reconstruct --l2 inf", [*recon, "-o", "out", "--l2", "inf", "--epochs", "0"], SIM, names=("--l2",))
    add(V, "reconstruct --shell-ridge inf", [*recon, "-o", "out", "--shell-ridge", "inf", "--epochs", "0"], SIM,
        names=("--shell-ridge",))
    add(V, "simulate --poses of a STAR file without angles", ["simulate", "sim/ground_truth.mrc", "-o", "out",
                                                            "--poses", ed],
        star_edit(lambda s: s.drop("particles", "rlnAngleRot")), names=("edited.star",))
    add(V, "simulate --poses of a missing file", ["simulate", "truth.mrc", "-o", "out", "--poses", "none.star"], SIM,
        names=("none.star",))
    for pad in ("0", "-1"):
        add(V, f"project --pad {pad}", ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs", "--pad", pad],
            SIM, names=("--pad",))
    add(V, "project --batch-size 0", ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs",
                                      "--batch-size", "0"], SIM, names=("--batch-size",))
    add(V, "reconstruct --batch-size 0", [*recon, "-o", "out", "--batch-size", "0"], SIM, names=("--batch-size",))
    add(V, "reconstruct --batch-size -3", [*recon, "-o", "out", "--batch-size", "-3"], SIM, names=("--batch-size",))
    add(V, "hessian --batch-size 0", ["hessian", "sim/particles.star", "-o", "out", "--batch-size", "0"], SIM,
        names=("--batch-size",))
    add(V, "reconstruct --epochs -1", [*recon, "-o", "out", "--epochs", "-1"], SIM, names=("--epochs",))
    add(V, "reconstruct --epochs 1.5", [*recon, "-o", "out", "--epochs", "1.5"], SIM, names=("--epochs",))
    add(V, "reconstruct --max-epochs 0", [*recon, "-o", "out", "--max-epochs", "0"], SIM, names=("--max-epochs",))
    add(V, "reconstruct --l2 -1", [*recon, "-o", "out", "--l2", "-1"], SIM, names=("--l2",))
    add(V, "reconstruct --l2 nan", [*recon, "-o", "out", "--l2", "nan"], SIM, names=("--l2",))
    add(V, "reconstruct --shell-ridge -1", [*recon, "-o", "out", "--shell-ridge", "-1"], SIM, names=("--shell-ridge",))
    add(V, "hessian --probes 0 (hutchinson)", ["hessian", "sim/particles.star", "-o", "out", "--method", "hutchinson",
                                               "--probes", "0"], SIM, names=("--probes",))
    add(V, "hessian --lanczos-iterations -1", ["hessian", "sim/particles.star", "-o", "out",
                                               "--lanczos-iterations", "-1"], SIM, names=("--lanczos-iterations",))
    add(V, "hessian --lanczos-radii 0", ["hessian", "sim/particles.star", "-o", "out", "--lanczos-radii", "0"], SIM,
        names=("--lanczos-radii",))
    add(V, "hessian --lanczos-radii 1000 (more than the box has shells)",
        ["hessian", "sim/particles.star", "-o", "out", "--lanczos-radii", "1000"], SIM, expect=(0, 2),
        may_change=("out",), note="accepted or refused, either is fine")
    for argv in (["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs"],
                 ["simulate", "truth.mrc", "-o", "out", "-n", "10"], [*recon, "-o", "out"],
                 ["hessian", "sim/particles.star", "-o", "out"], ["demo", "-o", "out"]):
        add(V, f"{argv[0]} --threads 0", argv + ["--threads", "0"], SIM, names=("--threads",))
    add(V, "reconstruct --threads -1", [*recon, "-o", "out", "--threads", "-1"], SIM, names=("--threads",))

    # ---- physical values: maps ---------------------------------------------------------
    def maps(**spec):
        def setup(f: Path):
            SIM(f)
            for name, (data, voxel) in spec.items():
                mrc(f / f"{name}.mrc", data, voxel)
        return setup
    vol = blob_phantom(16, seed=1)
    add(V, "fsc: A has voxel size 0 in its header", ["fsc", "a.mrc", "b.mrc"], maps(a=(vol, 0.0), b=(vol, 3.0)),
        names=("a.mrc", "voxel size"))
    add(V, "project a map with voxel size 0", ["project", "a.mrc", "sim/particles.star", "-o", "p.mrcs"],
        maps(a=(vol, 0.0)), names=("a.mrc", "voxel size"))
    add(V, "simulate from a map with voxel size 0", ["simulate", "a.mrc", "-o", "out", "-n", "10"],
        maps(a=(vol, 0.0)), names=("a.mrc", "voxel size"))
    add(V, "project a 2-D image as the map", ["project", "a.mrc", "sim/particles.star", "-o", "p.mrcs"],
        maps(a=(vol[8], 3.0)), names=("a.mrc",))
    add(V, "simulate from a 2-D image as the map", ["simulate", "a.mrc", "-o", "out", "-n", "10"],
        maps(a=(vol[8], 3.0)), names=("a.mrc",))
    add(V, "fsc of two 2-D images", ["fsc", "a.mrc", "b.mrc"], maps(a=(vol[8], 3.0), b=(vol[7], 3.0)),
        names=("a.mrc",))
    add(V, "project a particle stack (.mrcs) as the map", ["project", "sim/particles.mrcs", "sim/particles.star",
                                                           "-o", "p.mrcs"], SIM, names=("particles.mrcs",))
    nc = np.zeros((20, 16, 16), np.float32)
    nc[2:18] = vol
    add(V, "project a non-cubic map (16×16×20)", ["project", "a.mrc", "sim/particles.star", "-o", "p.mrcs"],
        maps(a=(nc, 3.0)), names=("a.mrc",))
    add(V, "simulate from a non-cubic map", ["simulate", "a.mrc", "-o", "out", "-n", "10"], maps(a=(nc, 3.0)),
        names=("a.mrc",))
    add(V, "fsc of two non-cubic maps", ["fsc", "a.mrc", "b.mrc"], maps(a=(nc, 3.0), b=(nc, 3.0)), names=("a.mrc",))
    add(V, "project a 32 px map at a STAR of 16 px images", ["project", "a.mrc", "sim/particles.star", "-o", "p.mrcs"],
        maps(a=(blob_phantom(32, seed=1), 3.0)), expect=(0, 2), may_change=("p.mrcs", "p.star"),
        check=_project_box_consistent, note="projections of the map's box, and p.star says so (as relion_project)")
    add(V, "project a 2 Å map at a STAR of 3 Å pixels", ["project", "a.mrc", "sim/particles.star", "-o", "p.mrcs"],
        maps(a=(vol, 2.0)), names=("rlnImagePixelSize", "voxel size"))
    nanvol = vol.copy()
    nanvol[8, 8, 8] = np.nan
    add(V, "project a map with a NaN voxel", ["project", "a.mrc", "sim/particles.star", "-o", "p.mrcs"],
        maps(a=(nanvol, 3.0)), names=("a.mrc",))
    add(V, "simulate from a map with a NaN voxel", ["simulate", "a.mrc", "-o", "out", "-n", "10"],
        maps(a=(nanvol, 3.0)), names=("a.mrc",))
    add(V, "simulate from an all-zero map (SNR undefined)", ["simulate", "a.mrc", "-o", "out", "-n", "10"],
        maps(a=(0 * vol, 3.0)), names=("a.mrc",))
    add(V, "fsc of maps of different shapes", ["fsc", "a.mrc", "b.mrc"],
        maps(a=(vol, 3.0), b=(blob_phantom(32, seed=1), 3.0)), names=("b.mrc",))
    add(V, "fsc of maps of different voxel sizes", ["fsc", "a.mrc", "b.mrc"], maps(a=(vol, 3.0), b=(vol, 2.0)),
        names=("b.mrc", "voxel size"))
    add(V, "fsc: B all zero", ["fsc", "a.mrc", "b.mrc"], maps(a=(vol, 3.0), b=(0 * vol, 3.0)), names=("b.mrc",))
    add(V, "fsc: mask all zero", ["fsc", "a.mrc", "b.mrc", "--mask", "m.mrc"],
        maps(a=(vol, 3.0), b=(vol, 3.0), m=(0 * vol, 3.0)), names=("m.mrc",))
    add(V, "fsc: mask of another shape", ["fsc", "a.mrc", "b.mrc", "--mask", "m.mrc"],
        maps(a=(vol, 3.0), b=(vol, 3.0), m=(np.ones((32, 32, 32)), 3.0)), names=("m.mrc",))
    add(V, "fsc: mask with negative values", ["fsc", "a.mrc", "b.mrc", "--mask", "m.mrc"],
        maps(a=(vol, 3.0), b=(vol, 3.0), m=(vol - vol.max(), 3.0)), names=("m.mrc",), expect=(0, 2),
        check=_fsc_numbers, note="accepted or refused, either is fine")
    add(V, "fsc: a map with a NaN voxel", ["fsc", "a.mrc", "b.mrc"], maps(a=(vol, 3.0), b=(nanvol, 3.0)),
        names=("b.mrc",))
    add(V, "fsc: a file that is not MRC", ["fsc", "a.mrc", "sim/particles.star"], maps(a=(vol, 3.0)),
        names=("particles.star",))
    add(V, "fsc: a file that does not exist", ["fsc", "a.mrc", "nothere.mrc"], maps(a=(vol, 3.0)),
        names=("nothere.mrc",))
    add(V, "fsc of a 2-pixel map", ["fsc", "a.mrc", "b.mrc"], maps(a=(np.ones((2, 2, 2)), 3.0),
                                                                   b=(np.ones((2, 2, 2)), 3.0)), names=("a.mrc",),
        check=_fsc_numbers)
    odd = blob_phantom(16, seed=1)[:15, :15, :15]
    add(V, "fsc of two 15³ maps (odd box)", ["fsc", "a.mrc", "b.mrc"], maps(a=(odd, 3.0), b=(odd[::-1], 3.0)),
        expect=(0, 2), names=("a.mrc",), check=_fsc_numbers, note="accepted or refused, either is fine")
    add(V, "fsc of a map with itself: FSC 1 everywhere", ["fsc", "a.mrc", "a.mrc"], maps(a=(vol, 3.0)),
        expect=(0,), check=_fsc_numbers)

    # ---- resume ------------------------------------------------------------------------
    R = "resume"
    first = cli(*recon, "-o", "r", "--epochs", "1", "--batch-size", "20")
    RUN = chain(SIM, first, pause())
    resume = [*recon, "-o", "r", "--epochs", "2", "--batch-size", "20", "--resume"]
    add(R, "--resume with no checkpoint (new folder)", [*recon, "-o", "new", "--resume"], SIM,
        names=("new", "checkpoint"))
    add(R, "--resume into an existing empty folder", [*recon, "-o", "new", "--resume"], chain(SIM, mkdir("new")),
        names=("new", "checkpoint"))
    add(R, "--resume into a folder holding another dataset's checkpoint", resume,
        chain(put("truth.mrc", "simB"), cli("reconstruct", "simB/particles.star", "-o", "r", "--epochs", "1",
                                            "--batch-size", "20"), SIM, pause()), names=("checkpoint.pt", "--resume"))
    add(R, "--resume with --method pcg (changed settings)", resume + ["--method", "pcg"], RUN,
        names=("--resume", "method"))
    add(R, "--resume with --seed 5 (another half-set split)", resume + ["--seed", "5"], RUN, names=("--resume", "seed"))
    add(R, "--resume with --box 8", resume + ["--box", "8"], RUN, names=("--resume",))
    add(R, "--resume with --interp nearest", resume + ["--interp", "nearest"], RUN, names=("--resume",))
    add(R, "--resume with --noise estimate", resume + ["--noise", "estimate"], RUN, names=("--resume",))

    def edit_defocus(f: Path):
        star = Star(f / "sim/particles.star")
        star.set("particles", "rlnDefocusU", lambda i, v: f"{float(v) + 100:.6f}", rows={0})
        star.write(f / "sim/particles.star")
    add(R, "--resume after editing the STAR in place (a defocus)", resume, chain(RUN, edit_defocus),
        names=("--resume",))

    def swap_stack(f: Path):
        shutil.copyfile(BASE / "simB/particles.mrcs", f / "sim/particles.mrcs")
    add(R, "--resume after the stack was replaced in place (same shape, other images)", resume,
        chain(RUN, swap_stack), names=("--resume",))

    def ckpt(content):
        def setup(f: Path):
            path = f / "r/checkpoint.pt"
            if content == "truncate":
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 3])
            elif content == "dir":
                path.unlink()
                path.mkdir()
            else:
                path.write_bytes(content)
        return setup
    add(R, "--resume with a truncated checkpoint.pt", resume, chain(RUN, ckpt("truncate")), names=("checkpoint.pt",))
    add(R, "--resume with a garbage checkpoint.pt", resume, chain(RUN, ckpt(b"\x00garbage" * 1000)),
        names=("checkpoint.pt",))
    add(R, "--resume with an empty checkpoint.pt", resume, chain(RUN, ckpt(b"")), names=("checkpoint.pt",))
    add(R, "--resume with a checkpoint.pt that is a folder", resume, chain(RUN, ckpt("dir")), names=("checkpoint.pt",))
    add(R, "--resume with a hessian folder's files (no checkpoint)", [*recon, "-o", "h", "--resume"],
        chain(SIM, cli("hessian", "sim/particles.star", "-o", "h", "--lanczos-iterations", "0")),
        names=("checkpoint",))
    add(R, "--resume with the same data and settings, one more epoch: continues", resume, RUN, expect=(0,),
        may_change=("r",), check=exists("r/map.mrc"))

    # ---- concurrency ---------------------------------------------------------------------
    add("concurrency", "two runs into one folder at once", [], put("big"), runner=run_concurrent)

    # ---- output paths ----------------------------------------------------------------------
    O = "output paths"
    for argv in ([*recon, "-o", "out"], ["hessian", "sim/particles.star", "-o", "out"],
                 ["simulate", "truth.mrc", "-o", "out", "-n", "10"], ["demo", "-o", "out"]):
        add(O, f"{argv[0]} -o an existing file", argv, chain(SIM, write_file("out", "a file")), names=("out",))
    for argv in ([*recon, "-o", "out/sub"], ["simulate", "truth.mrc", "-o", "out/sub", "-n", "10"],
                 ["project", "truth.mrc", "sim/particles.star", "-o", "out/p.mrcs"]):
        add(O, f"{argv[0]} -o below an existing file", argv, chain(SIM, write_file("out", "a file")), names=("out",))
    add(O, "project: the stack path is a folder", ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs"],
        chain(SIM, mkdir("p.mrcs")), names=("p.mrcs",))
    add(O, "project: the stack path is a folder, with --force",
        ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs", "--force"], chain(SIM, mkdir("p.mrcs")),
        names=("p.mrcs",))
    add(O, "project: OUT.star beside it is a folder", ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs"],
        chain(SIM, mkdir("p.star")), names=("p.star",))
    add(O, "project -o p.mrc (not .mrcs)", ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrc"], SIM,
        names=("p.mrc",), expect=(0, 2), may_change=("p.mrc", "p.star"),
        note="accepted or refused, either is fine (RELION reads .mrc stacks)")
    add(O, "project -o p (no suffix)", ["project", "truth.mrc", "sim/particles.star", "-o", "p"], SIM, names=("p",))
    add(O, "project -o new/deep/p.mrcs (missing parents)", ["project", "truth.mrc", "sim/particles.star",
                                                            "-o", "new/deep/p.mrcs"], SIM, expect=(0, 2),
        may_change=("new",), note="accepted or refused, either is fine")
    add(O, "reconstruct -o '' (an unset shell variable)", [*recon, "-o", "", "--epochs", "0"], SIM, names=("-o",))
    add(O, "simulate -o ''", ["simulate", "truth.mrc", "-o", "", "-n", "10"], SIM, names=("-o",))
    add(O, "project -o ''", ["project", "truth.mrc", "sim/particles.star", "-o", ""], SIM, names=("-o",))
    add(O, "reconstruct of a dataset in a folder with spaces, into a folder with spaces: accepted",
        ["reconstruct", "my data/particles.star", "-o", "my out", "--epochs", "0"],
        lambda f: shutil.copytree(BASE / "sim", f / "my data"), expect=(0,), may_change=("my out",),
        check=exists("my out/map.mrc"))
    add(O, "reconstruct -o an unwritable folder", [*recon, "-o", "locked"], SIM, names=("locked",),
        runner=run_readonly)
    add(O, "simulate -o an unwritable folder", ["simulate", "truth.mrc", "-o", "locked", "-n", "10"], SIM,
        names=("locked",), runner=run_readonly)
    add(O, "project -o into an unwritable folder", ["project", "truth.mrc", "sim/particles.star",
                                                    "-o", "locked/p.mrcs"], SIM, names=("locked",), runner=run_readonly)
    add(O, "reconstruct -o a new folder below an unwritable one", [*recon, "-o", "locked/sub"], SIM,
        names=("locked",), runner=run_readonly)

    # ---- devices -----------------------------------------------------------------------------
    G = "devices"
    n_gpu = CUDA or 0
    for dev in ("cuda", "cuda:7", "gpu0", "", "meta", "mps", "cpu:1"):
        ok = (dev == "cuda" and n_gpu >= 1) or (dev == "cuda:7" and n_gpu >= 8) or dev == "cpu:1"
        add(G, f"reconstruct --device {dev!r}", [*recon, "-o", "out", "--device", dev, "--epochs", "0"], SIM,
            expect=((0, 2) if dev == "cpu:1" else (0,)) if ok else (2,), may_change=("out",) if ok else (),
            names=() if ok else ("--device",), note="torch's cpu:1 is the CPU" if dev == "cpu:1" else "")
    add(G, "project --device gpu0", ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs", "--device", "gpu0"],
        SIM, names=("--device",))
    add(G, "simulate --device cuda:7", ["simulate", "truth.mrc", "-o", "out", "-n", "10", "--device", "cuda:7"], SIM,
        expect=(0,) if n_gpu >= 8 else (2,), may_change=("out",), names=("--device",))
    add(G, "hessian --device cuda" + ("" if n_gpu else " (no GPU here)"),
        ["hessian", "sim/particles.star", "-o", "out", "--device", "cuda", "--lanczos-iterations", "0"], SIM,
        expect=(0,) if n_gpu else (2,), may_change=("out",) if n_gpu else (), names=() if n_gpu else ("--device",))
    add(G, "demo --device gpu0", ["demo", "-o", "out", "--device", "gpu0"], None, names=("--device",), timeout=60)

    # ---- Ctrl-C ------------------------------------------------------------------------------
    K = "Ctrl-C"
    add(K, "Ctrl-C reconstruct once checkpoint.pt exists",
        ["reconstruct", "big/particles.star", "-o", "out", "--epochs", "40"], put("big"), expect=(130,),
        may_change=("out",), names=("interrupted", "--resume"),
        runner=lambda c, f: run_interrupt(c, f, ready=lambda d: (d / "out/checkpoint.pt").exists(), allowed_rel="out",
                                          continue_check=("out/map.mrc",)))
    add(K, "Ctrl-C twice (50 ms apart) during reconstruct",
        ["reconstruct", "big/particles.star", "-o", "out", "--epochs", "40"], put("big"), expect=(130,),
        may_change=("out",), names=("interrupted",),
        runner=lambda c, f: run_interrupt(c, f, ready=lambda d: (d / "out/checkpoint.pt").exists(), allowed_rel="out",
                                          continue_check=False, double=True))
    add(K, "Ctrl-C reconstruct during the first pass (before any checkpoint)",
        ["reconstruct", "big/particles.star", "-o", "out", "--epochs", "40"], put("big"), expect=(130,),
        may_change=("out",), names=("interrupted",),
        runner=lambda c, f: run_interrupt(c, f, ready=lambda d: (d / "out/run.json").exists(), allowed_rel="out",
                                          continue_check=("out/map.mrc",)))

    def simulate_ready(d: Path):  # a second into writing the stack
        return (d / "out/run.json").exists() and _older_than(d / "out/run.json", 1.0)
    add(K, "Ctrl-C simulate -n 20000: no partial particles.mrcs, no folder left",
        ["simulate", "map32.mrc", "-o", "out", "-n", "20000"], put("map32.mrc"), expect=(130,),
        names=("interrupted",), check=lambda f, r: "particles.mrcs left" if (f / "out/particles.mrcs").exists() else None,
        runner=lambda c, f: run_interrupt(c, f, ready=simulate_ready, allowed_rel="out",
                                          continue_check=("out/particles.mrcs",)))
    add(K, "Ctrl-C reconstruct at 8 moments from the start of its work", ["reconstruct", "big/particles.star", "-o",
                                                                        "out", "--epochs", "40"],
        put("big"), expect=(130,), may_change=("out",), names=("interrupted",),
        runner=lambda c, f: run_interrupt_sweep(c, f, trigger="out/run.json",
                                                delays=[0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.2]))
    add(K, "Ctrl-C hessian at 8 moments around its first outputs and plots",
        ["hessian", "big/particles.star", "-o", "out"], put("big"), expect=(130,), may_change=("out",),
        names=("interrupted",),
        runner=lambda c, f: run_interrupt_sweep(c, f, trigger="out/run.json",
                                                delays=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]))
    add(K, "Ctrl-C hessian", ["hessian", "big/particles.star", "-o", "out"], put("big"), expect=(130,),
        may_change=("out",), names=("interrupted",),
        runner=lambda c, f: run_interrupt(c, f, ready=lambda d: (d / "out/run.json").exists()
                                          and _older_than(d / "out/run.json", 0.5), allowed_rel="out",
                                          continue_check=False))
    add(K, "Ctrl-C demo once it has simulated", ["demo", "-o", "out", "-n", "3000"], None, expect=(130,),
        may_change=("out",), names=("interrupted",),
        runner=lambda c, f: run_interrupt(c, f, ready=lambda d: (d / "out/data/particles.star").exists(), allowed_rel="out",
                                          continue_check=("out/map.mrc",)))

    # ---- help and choices --------------------------------------------------------------------
    H = "help"
    add(H, "cryosgd --help", ["--help"], expect=(0,), check=no_bool_in_help, runner=run_help)
    for cmd in ("project", "simulate", "reconstruct", "fsc", "hessian", "demo"):
        add(H, f"cryosgd {cmd} --help (no option shown as taking <bool>)", [cmd, "--help"], expect=(0,),
            check=no_bool_in_help, runner=run_help)
    add(H, "no command", [], names=("COMMAND",))
    add(H, "unknown command (a typo)", ["reconstruc", "sim/particles.star", "-o", "out"], SIM, names=("reconstruc",))
    add(H, "reconstruct --method newton", [*recon, "-o", "out", "--method", "newton"], SIM, names=("--method", "newton"))
    add(H, "project --interp cubic", ["project", "truth.mrc", "sim/particles.star", "-o", "p.mrcs", "--interp", "cubic"],
        SIM, names=("--interp", "cubic"))
    add(H, "reconstruct --interp cubic", [*recon, "-o", "out", "--interp", "cubic"], SIM, names=("--interp",))
    add(H, "reconstruct --store tape", [*recon, "-o", "out", "--store", "tape"], SIM, names=("--store", "tape"))
    add(H, "reconstruct --store-dtype float16", [*recon, "-o", "out", "--store-dtype", "float16"], SIM,
        names=("--store-dtype",))
    add(H, "reconstruct --prior gaussian", [*recon, "-o", "out", "--prior", "gaussian"], SIM, names=("--prior",))
    add(H, "hessian --method lanczos", ["hessian", "sim/particles.star", "-o", "out", "--method", "lanczos"], SIM,
        names=("--method",))
    add(H, "unknown option --iterations", [*recon, "-o", "out", "--iterations", "5"], SIM, names=("--iterations",))
    add(H, "unknown option --gpu (demo)", ["demo", "--gpu"], None, names=("--gpu",))
    add(H, "missing -o (reconstruct)", list(recon), SIM, names=("-o",))
    add(H, "missing argument: project with the map only", ["project", "truth.mrc", "-o", "p.mrcs"], SIM,
        names=("PARTICLES.star",))
    add(H, "missing value: --epochs at the end", [*recon, "-o", "out", "--epochs"], SIM, names=("--epochs",))
    add(H, "fsc with one map", ["fsc", "truth.mrc"], SIM, names=("B.mrc",))
    add(H, "--version: prints the version", ["--version"], None, expect=(0,),
        check=lambda folder, row: None if row.stdout.startswith("cryosgd ") else "no version on stdout")

    # ---- the pose-search commands and map tools ---------------------------------------------
    P = "refine, abinitio, auto, postprocess, flip"
    ref = ("refine", "sim/particles.star", "-o", "out", "--max-iter", "1")
    ref5 = put_map("ref5.mrc", 5.0)
    nan_map = put_map("nan.mrc", 3.0, nan=True)
    M32 = put("truth.mrc", "sim", "map32.mrc")

    def no_poses(star: Star) -> None:
        for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
            star.drop("particles", column)
    add(P, "refine --ref a missing file", [*ref, "--ref", "nope.mrc"], SIM, names=("nope.mrc",))
    add(P, "refine --ref a 32³ map for 16 px particles: resampled", [*ref, "--ref", "map32.mrc"], M32,
        expect=(0,), may_change=("out",), check=exists("out/map.mrc"))
    add(P, "refine --ref a map of 5 Å pixels for 3 Å particles: resampled", [*ref, "--ref", "ref5.mrc"],
        chain(SIM, ref5), expect=(0,), may_change=("out",), check=exists("out/map.mrc"))
    add(P, "refine --ref a map with NaN", [*ref, "--ref", "nan.mrc"], chain(SIM, nan_map), names=("nan.mrc",))
    add(P, "refine --mask a 32³ map", [*ref, "--ref", "truth.mrc", "--mask", "map32.mrc"], M32,
        names=("map32.mrc",))
    add(P, "refine --mask a map of 5 Å pixels for 3 Å particles", [*ref, "--ref", "truth.mrc", "--mask", "ref5.mrc"],
        chain(SIM, ref5), names=("ref5.mrc", "voxel size"))
    add(P, "refine --join-res 5: finer than 1.5 × Nyquist (9 Å)", [*ref, "--ref", "truth.mrc", "--join-res", "5"],
        SIM, names=("--join-res",))
    add(P, "refine --sym X9", [*ref, "--ref", "truth.mrc", "--sym", "X9"], SIM, names=("--sym", "X9"))
    add(P, "refine --local on a STAR without angles", ["refine", "sim/edited.star", "-o", "out", "--ref", "truth.mrc",
                                                      "--local"], chain(put("truth.mrc"), star_edit(no_poses)),
        names=("edited.star",))
    add(P, "refine --particle-diameter larger than the box", [*ref, "--ref", "truth.mrc", "--particle-diameter", "500"],
        SIM, names=("--particle-diameter",))
    add(P, "refine -o out: out holds a foreign map.mrc", [*ref, "--ref", "truth.mrc"],
        chain(SIM, write_file("out/map.mrc")), names=("map.mrc",))
    add(P, "refine --resume on another dataset's checkpoint",
        ["refine", "simB/particles.star", "-o", "out", "--ref", "truth.mrc", "--max-iter", "1", "--resume"],
        chain(SIM, put("simB"), cli(*ref, "--ref", "truth.mrc")), names=("--resume",))
    add(P, "abinitio --start-res finer than --end-res", ["abinitio", "sim/particles.star", "-o", "out",
                                                        "--start-res", "10", "--end-res", "20"], SIM,
        names=("--start-res",))
    add(P, "abinitio --particle-diameter larger than the box", ["abinitio", "sim/particles.star", "-o", "out",
                                                               "--particle-diameter", "500"], SIM,
        names=("--particle-diameter",))
    add(P, "abinitio -o out: out holds a foreign initial.mrc", ["abinitio", "sim/particles.star", "-o", "out"],
        chain(SIM, write_file("out/initial.mrc")), names=("initial.mrc",))
    add(P, "auto --sym X9", ["auto", "sim/particles.star", "-o", "out", "--sym", "X9"], SIM, names=("--sym", "X9"))
    add(P, "auto -o out: out holds a foreign map_sharpened.mrc", ["auto", "sim/particles.star", "-o", "out"],
        chain(SIM, write_file("out/map_sharpened.mrc")), names=("map_sharpened.mrc",))
    add(P, "postprocess: half maps of 16 and 32 px", ["postprocess", "truth.mrc", "map32.mrc", "-o", "out"], M32,
        names=("map32.mrc",))
    add(P, "postprocess: half maps of 3 and 5 Å pixels", ["postprocess", "truth.mrc", "ref5.mrc", "-o", "out"],
        chain(SIM, ref5), names=("ref5.mrc",))
    add(P, "postprocess: a half map with NaN", ["postprocess", "truth.mrc", "nan.mrc", "-o", "out"],
        chain(SIM, nan_map), names=("nan.mrc",))
    add(P, "postprocess --mask a 32³ map", ["postprocess", "truth.mrc", "sim/ground_truth.mrc", "-o", "out",
                                            "--mask", "map32.mrc"], M32, names=("map32.mrc",))
    add(P, "postprocess --mask a map of 5 Å pixels", ["postprocess", "truth.mrc", "sim/ground_truth.mrc", "-o", "out",
                                                      "--mask", "ref5.mrc"], chain(SIM, ref5),
        names=("ref5.mrc", "voxel size"))
    halves = chain(put_map("half1.mrc", 3.0, noise_seed=1), put_map("half2.mrc", 3.0, noise_seed=2))
    add(P, "postprocess: half maps of about 12 Å, coarser than --autob-lowres: not sharpened",
        ["postprocess", "half1.mrc", "half2.mrc", "-o", "out"], halves, expect=(0,), may_change=("out",),
        check=exists("out/map_sharpened.mrc"))
    add(P, "postprocess -o out: out holds a foreign map_sharpened.mrc",
        ["postprocess", "truth.mrc", "sim/ground_truth.mrc", "-o", "out"],
        chain(SIM, write_file("out/map_sharpened.mrc")), names=("map_sharpened.mrc",))
    add(P, "flip -o the input map", ["flip", "truth.mrc", "-o", "truth.mrc"], SIM, names=("truth.mrc",))
    add(P, "flip a missing map", ["flip", "nope.mrc", "-o", "f.mrc"], SIM, names=("nope.mrc",))
    add(P, "flip -o a foreign file without --force", ["flip", "truth.mrc", "-o", "f.mrc"],
        chain(SIM, write_file("f.mrc")), names=("f.mrc",))
    add(P, "flip: accepted", ["flip", "truth.mrc", "-o", "f.mrc"], SIM, expect=(0,), may_change=("f.mrc",),
        check=exists("f.mrc"))

    # ---- umask -------------------------------------------------------------------------------
    U = "umask"
    add(U, "reconstruct under umask 022: files 0644, folder 0755", [*recon, "-o", "r", "--epochs", "0"], SIM,
        expect=(0,), may_change=("r",), umask=0o022, check=modes("r", 0o644, 0o755))
    add(U, "simulate under umask 022: files 0644, folder 0755", ["simulate", "truth.mrc", "-o", "out", "-n", "10"],
        SIM, expect=(0,), may_change=("out",), umask=0o022, check=modes("out", 0o644, 0o755))
    add(U, "project under umask 022: p.mrcs and p.star 0644", ["project", "truth.mrc", "sim/particles.star",
                                                              "-o", "p.mrcs"], SIM, expect=(0,),
        may_change=("p.mrcs", "p.star"), umask=0o022, check=modes("p.mrcs", 0o644))
    add(U, "hessian under umask 022: files 0644", ["hessian", "sim/particles.star", "-o", "h",
                                                   "--lanczos-iterations", "0"], SIM, expect=(0,), may_change=("h",),
        umask=0o022, check=modes("h", 0o644, 0o755))
    add(U, "simulate under umask 077: files 0600, folder 0700", ["simulate", "truth.mrc", "-o", "out", "-n", "10"],
        SIM, expect=(0,), may_change=("out",), umask=0o077, check=modes("out", 0o600, 0o700))
    add(U, "reconstruct under umask 002: files 0664", [*recon, "-o", "r", "--epochs", "0"], SIM,
        expect=(0,), may_change=("r",), umask=0o002, check=modes("r", 0o664, 0o775))
    return C


def _fsc_numbers(folder: Path, row: Row):
    """An FSC that was printed must be numbers: no NaN, no infinite resolution."""
    if row.code == 0 and re.search(r"\bnan\b|resolution at FSC [0-9.]+: inf", row.stdout):
        lines = [l.strip() for l in row.stdout.splitlines() if re.search(r"\bnan\b|: inf", l)]
        return "exit 0 with a meaningless FSC: " + " / ".join(lines[:3])


def _project_box_consistent(folder: Path, row: Row):
    if row.code != 0:
        return None
    with mrcfile.open(folder / "p.mrcs", permissive=True) as m:
        box = m.data.shape[-1]
    size = Star(folder / "p.star").blocks["optics"]
    value = dict(zip(size[0], size[1][0])).get("rlnImageSize")
    if value is not None and int(float(value)) != box:
        return f"p.star says rlnImageSize {value} but p.mrcs holds images of {box} px"


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _nan_stack(path: Path) -> None:
    with warnings.catch_warnings(), mrcfile.open(path, "r+") as m:
        warnings.simplefilter("ignore")
        data = m.data.copy()
        data[4, 8, 8] = np.nan
        m.set_data(data)


# --------------------------------------------------------------------------------------------
# Building the shared inputs, running the cases, writing the table
# --------------------------------------------------------------------------------------------

def build_base(base: Path) -> None:
    base.mkdir(parents=True)
    write_map(base / "truth.mrc", blob_phantom(16), 3.0)
    write_map(base / "map32.mrc", blob_phantom(32), 3.0)
    with resources.as_file(resources.files("cryosgd") / "data" / "1ubq.pdb") as pdb:
        shutil.copy2(pdb, base / "model.pdb")
    for argv in (["simulate", "truth.mrc", "-o", "sim", "-n", "60", "--snr", "1"],
                 ["simulate", "truth.mrc", "-o", "simB", "-n", "60", "--snr", "1", "--seed", "7"],
                 ["simulate", "truth.mrc", "-o", "big", "-n", "4000", "--snr", "1"]):
        code, out, err, _ = run(argv, base)
        if code != 0:
            raise SystemExit(f"building the inputs failed: {cmdline(argv)}: exit {code}\n{err}")


def run_case(i: int, case: Case, root: Path) -> list[Row]:
    slug = re.sub(r"[^a-z0-9]+", "-", case.desc.lower()).strip("-")[:40]
    folder = root / "cases" / f"{i:03d}-{slug}"
    folder.mkdir(parents=True)
    try:
        if case.setup:
            case.setup(folder)
    except Exception as err:  # a setup that failed is this script's bug, or the product's
        return [Row(case.cls, case.desc, cmdline(case.argv), verdict="FAIL",
                    reason=f"setup failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}")]
    rows = (case.runner or run_plain)(case, folder)
    for row in rows:
        row.first = row.first.replace(str(folder) + "/", "").replace(str(folder), ".")
        row.first = row.first.replace(str(root) + "/", "").replace(str(root), "WORKDIR")
    return rows


def markdown(rows: list[Row], argv: list[str], seconds: float) -> str:
    n_fail = sum(r.verdict == "FAIL" for r in rows)
    n_skip = sum(r.verdict == "SKIP" for r in rows)
    today = datetime.date.today().isoformat()

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def code(text: str) -> str:
        if not text:
            return ""
        ticks = "``" if "`" in text else "`"
        pad = " " if "`" in text else ""
        return f"{ticks}{pad}{cell(text)}{pad}{ticks}"

    out = [
        "# Reliability: bad and hostile input",
        "",
        "Promised (README): bad input stops with one line on stderr naming the file and the field (or the "
        "option and the value), exit code 2, nothing half-written and no output folder left behind; no "
        "traceback; no silently wrong result; no input or existing output overwritten without `--force` "
        "(a folder holding the same command's earlier run, per its `run.json`, may be reused); `--resume` "
        "only from a checkpoint of the same STAR file, particle table, stacks and settings; a second run into "
        "a busy folder stops with one line (a lock); Ctrl-C prints one line saying how to continue (exit "
        "130); outputs get the umask's permissions. `benchmarks/bad_inputs.py` checks this from outside: it "
        "builds small valid inputs (a 16³ map, `cryosgd simulate` datasets, STAR files edited from them) and "
        "runs each case as a real subprocess in a folder of its own, comparing that folder's file tree "
        "(sizes, mtimes) before and after. OK means: the expected exit code (2; 130 for Ctrl-C; 0 where the "
        "input is legitimately accepted), at most one line on stderr, no traceback, the message names what "
        "it should, and nothing changed that must not. `tests/test_reliability.py` unit-tests the same "
        "promises in-process.",
        "",
        "Produced by:",
        "",
        "```",
        "python " + " ".join(shlex.quote(a) for a in argv),
        "```",
        "",
        f"on {today} ({os.cpu_count()} CPUs, torch {_torch_version()}, "
        f"{'CUDA' if CUDA else 'no GPU'}; running as {'root' if os.geteuid() == 0 else 'a user'}), "
        f"in {seconds:.0f} s. {len(rows)} cases: {len(rows) - n_fail - n_skip} OK, {n_fail} FAIL"
        + (f", {n_skip} skipped" if n_skip else "") + ".",
        "",
        "Commands run in the case's folder; messages are verbatim (temporary paths shortened to relative ones).",
        "",
        "| class | case | command | exit | message | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        first = r.first + (f" (+{r.lines - 1} more lines)" if r.lines > 1 else "")
        verdict = r.verdict + (f": {r.reason}" if r.reason else "")
        out.append(f"| {cell(r.cls)} | {cell(r.desc)} | {code(r.cmd)} | "
                   f"{'—' if r.code is None else r.code} | {code(first)} | {cell(verdict)} |")
    return "\n".join(out) + "\n"


def _torch_version() -> str:
    import torch
    return torch.__version__


def main() -> int:
    global BASE, CUDA, TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the inputs and case folders here (default: a "
                                                     "temporary folder, removed at the end)")
    parser.add_argument("--markdown", type=Path, help="write the table, with how it was made, to this file")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="cases run at once (the timing-sensitive ones run alone at the end)")
    parser.add_argument("--only", help="run only the cases whose class or description contains this text")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per command (default: %(default)s)")
    args = parser.parse_args()
    TIMEOUT = args.timeout
    import torch
    CUDA = torch.cuda.device_count() if torch.cuda.is_available() else 0

    start = time.monotonic()
    if args.workdir:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            parser.error(f"--workdir {args.workdir}: not empty")
        root = args.workdir.resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="cryosgd_bad_inputs_")).resolve()
    BASE = root / "base"
    print(f"inputs and case folders in {root}", flush=True)
    build_base(BASE)

    todo = [(i, c) for i, c in enumerate(cases(), 1)
            if not args.only or args.only.lower() in (c.cls + " " + c.desc).lower()]
    serial = [(i, c) for i, c in todo if c.cls in ("concurrency", "Ctrl-C")]
    pooled = [(i, c) for i, c in todo if (i, c) not in serial]
    results: dict[int, list[Row]] = {}

    def report(i: int, rows: list[Row]) -> None:
        results[i] = rows
        for r in rows:
            tag = r.verdict if r.verdict != "OK" else "ok"
            print(f"[{len(results):3d}/{len(todo)}] {tag:4s} {r.cls}: {r.desc}  (exit {r.code}, {r.seconds:.1f} s)"
                  + (f"\n           {r.reason}\n           {r.first}" if r.verdict == "FAIL" else ""), flush=True)

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_case, i, c, root): i for i, c in pooled}
        for future in concurrent.futures.as_completed(futures):
            report(futures[future], future.result())
    for i, c in serial:
        report(i, run_case(i, c, root))

    rows = [r for i, _ in todo for r in results[i]]
    seconds = time.monotonic() - start
    n_fail = sum(r.verdict == "FAIL" for r in rows)
    print(f"{len(rows)} cases, {n_fail} FAIL, {sum(r.verdict == 'SKIP' for r in rows)} skipped, {seconds:.0f} s")
    if args.markdown:
        argv = [os.path.relpath(__file__)] + sys.argv[1:]
        args.markdown.write_text(markdown(rows, argv, seconds))
        print(f"wrote {args.markdown}")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
