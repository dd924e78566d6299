"""What people look at: plots (PNG), image montages and the progress display.

Figures are drawn with matplotlib's object interface (``matplotlib.figure.Figure``), imported
when a plot is made: importing cryosgd never imports matplotlib or changes its backend.
Every file is written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cryosgd.fourier.fsc import FSCCurve
from cryosgd.io.atomic import atomic_path, write_lines

__all__ = ["Progress", "save_curves", "save_fsc_plot", "save_heatmap", "save_montage", "save_progress_plot",
           "write_lines"]


def _figure(width: float = 6, height: float = 4, columns: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(path)


def save_montage(path: str | Path, rows: dict[str, np.ndarray]) -> Path:
    """One row of images ``(k, y, x)`` per label, in grey with y up (as in RELION's display)."""
    from matplotlib.figure import Figure

    labels = list(rows)
    k = max(len(v) for v in rows.values())
    fig = Figure(figsize=(1.6 * k, 1.7 * len(labels)))
    axes = fig.subplots(len(labels), k, squeeze=False)
    for r, label in enumerate(labels):
        for c in range(k):
            axes[r, c].axis("off")
            if c < len(rows[label]):
                axes[r, c].imshow(rows[label][c], cmap="gray", origin="lower")
        axes[r, 0].set_title(label, loc="left", fontsize=9)
    return _save(fig, path)


def save_fsc_plot(path: str | Path, curves: dict[str, tuple[FSCCurve, float]], title: str) -> Path:
    """FSC curves against spatial frequency (1/Å, bottom) and resolution (Å, top), with the
    0.5 and 0.143 thresholds labelled; ``curves`` maps a label to (curve, the threshold at which
    its resolution is quoted: 0.143 between half maps, 0.5 against a ground truth)."""
    fig, (ax,) = _figure()
    for label, (curve, threshold) in curves.items():
        freq = np.arange(len(curve.fsc)) / (curve.box_px * curve.pixel_A)
        ax.plot(freq, curve.fsc, "-o", markersize=3,
                label=f"{label}: {curve.resolution_at(threshold):.2f} Å at {threshold}")
    for threshold in (0.5, 0.143):
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(f"{threshold}", (1.0, threshold), xycoords=("axes fraction", "data"), xytext=(-4, 2),
                    textcoords="offset points", ha="right", fontsize=8, color="grey")
    ax.set(xlabel="spatial frequency (1/Å)", ylabel="FSC", ylim=(-0.1, 1.05), title=title)
    ax.set_xlim(left=0)
    ticks = [t for t in ax.get_xticks() if 0 < t <= ax.get_xlim()[1]]
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    top.set_xticks(ticks, [f"{1 / t:.3g}" for t in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def save_progress_plot(path: str | Path, metrics: list[dict]) -> Path:
    """Per epoch (0 = the first pass): the half-map FSC (mean over shells, on the FSC's own 0–1
    scale), and how much each half's map changed in the epoch (% of its norm)."""
    fig, (left, right) = _figure(10, 4, columns=2)
    epochs = sorted({m["epoch"] for m in metrics})
    fsc = [next(m["fsc_mean"] for m in metrics if m["epoch"] == e) for e in epochs]
    left.plot(epochs, fsc, "-o")
    for e, value in zip(epochs, fsc):
        left.annotate(f"{value:.3f}", (e, value), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    left.set(xlabel="epoch (0 = first pass)", ylabel="mean half-map FSC", ylim=(0, 1), title="half-map FSC")
    for half in sorted({m["half"] for m in metrics}):
        rows = [m for m in metrics if m["half"] == half and m.get("map_change") is not None]
        right.plot([m["epoch"] for m in rows], [100 * m["map_change"] for m in rows], "-o", label=f"half {half}")
    right.set(xlabel="epoch", ylabel="‖x_e − x_(e−1)‖ / ‖x_e‖ (%)", title="change of each half map in the epoch")
    right.set_ylim(bottom=0)
    if any(m.get("map_change") is not None for m in metrics):
        right.legend()
    for ax in (left, right):
        ax.set_xticks(epochs)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    return _save(fig, path)


def save_curves(path: str | Path, x: np.ndarray, curves: dict[str, np.ndarray], *, xlabel: str, ylabel: str,
                title: str, log: bool = False, markers: dict[str, tuple] | None = None) -> Path:
    """Labelled curves over a common x (lines), plus labelled point sets ``{label: (x, y)}``."""
    fig, (ax,) = _figure()
    for label, y in curves.items():
        ax.plot(x, y, "-", label=label)
    for label, (mx, my) in (markers or {}).items():
        ax.plot(mx, my, "o", label=label)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def save_heatmap(path: str | Path, values: np.ndarray, *, xlabel: str, ylabel: str, title: str,
                 vmin: float = 0.0, vmax: float = 1.0, first_column: int = 0) -> Path:
    """A ``(rows, columns)`` array as an image, rows along y (e.g. epochs × shells); columns are
    labelled from ``first_column``, rows from 0."""
    fig, (ax,) = _figure(7, 3.5)
    rows, columns = values.shape
    image = ax.imshow(values, aspect="auto", origin="lower", vmin=vmin, vmax=vmax, cmap="viridis",
                      extent=(first_column - 0.5, first_column + columns - 0.5, -0.5, rows - 0.5))
    fig.colorbar(image, ax=ax)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(fig, path)


class Progress:
    """A progress bar on a terminal (rich), plain lines otherwise; silent on ranks > 0."""

    def __init__(self, label: str, enabled: bool = True):
        self.enabled, self.label, self.bar, self.task = enabled, label, None, None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress as Bar

            self.bar = Bar(transient=True)
            self.bar.start()

    def total(self, steps: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(self.label, total=steps)

    def advance(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
