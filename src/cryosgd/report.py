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

__all__ = ["Progress", "save_abinitio_plot", "save_curves", "save_fsc_plot", "save_heatmap", "save_montage",
           "save_progress_plot", "save_refinement_plot", "save_sections", "write_lines"]


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


def save_refinement_plot(path: str | Path, metrics: list[dict]) -> Path:
    """Per iteration: the half-map resolution and the search band (Å), and how the poses
    settle (the fraction that moved, the angular accuracy and the final step in degrees)."""
    fig, (left, right) = _figure(10, 4, columns=2)
    it = [m["iteration"] for m in metrics]
    left.plot(it, [m["resolution_A"] for m in metrics], "-o", label="half-map resolution (FSC 0.143)")
    left.plot(it, [m["band_A"] for m in metrics], "--s", label="search band")
    left.set(xlabel="iteration", ylabel="Å", title="resolution")
    left.invert_yaxis()
    left.legend(fontsize=8)
    right.plot(it, [100 * m["changed"] for m in metrics], "-o", label="poses moved (%)")
    right.plot(it, [m["accuracy_deg"] for m in metrics], "-s", label="angular accuracy (°)")
    right.plot(it, [m["final_step_deg"] for m in metrics], ":^", label="finest search step (°)")
    right.set(xlabel="iteration", title="poses")
    right.set_yscale("log")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(it)
    return _save(fig, path)


def save_sections(path: str | Path, volume: np.ndarray, title: str) -> Path:
    """The three central sections (z, y and x through the box centre) of a ``[z, y, x]`` map."""
    from matplotlib.figure import Figure

    n = volume.shape[0]
    fig = Figure(figsize=(9, 3.3))
    axes = fig.subplots(1, 3)
    for ax, (label, section) in zip(axes, (("xy (z = centre)", volume[n // 2]), ("xz (y = centre)", volume[:, n // 2]),
                                           ("yz (x = centre)", volume[:, :, n // 2]))):
        ax.imshow(section, cmap="gray", origin="lower")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_abinitio_plot(path: str | Path, metrics: list[dict]) -> Path:
    """Per step: the band (Å) and the loss of the minibatch, and the share of the best pose."""
    fig, (left, right) = _figure(10, 4, columns=2)
    steps = [m["step"] for m in metrics]
    left.plot(steps, [m["band_A"] for m in metrics], "-", label="band (Å)")
    left.set(xlabel="step", ylabel="Å", title="band")
    left.invert_yaxis()
    twin = left.twinx()
    twin.plot(steps, [m["loss"] for m in metrics], "-", color="tab:orange", label="minibatch loss")
    twin.set_ylabel("loss (per image)")
    left.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    right.plot(steps, [100 * m["best_probability"] for m in metrics], "-")
    right.set(xlabel="step", ylabel="%", ylim=(0, 100), title="weight of each image's best pose (mean)")
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


def plural(count: int, noun: str) -> str:
    """``"1 iteration"``, ``"8 iterations"``."""
    return f"{count} {noun}{'s' * (count != 1)}"


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
