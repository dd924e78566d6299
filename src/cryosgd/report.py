"""What people look at: image montages, FSC and loss plots (matplotlib, Agg), text files.

Everything is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cryosgd.io.atomic import atomic_path  # noqa: E402


def save_montage(path: str | Path, rows: dict[str, np.ndarray]) -> Path:
    """One row of images ``(k, y, x)`` per label, in grey with y up (as in RELION's display)."""
    labels = list(rows)
    k = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(labels), k, figsize=(1.6 * k, 1.7 * len(labels)), squeeze=False)
    for r, label in enumerate(labels):
        for c in range(k):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(rows[label]):
                ax.imshow(rows[label][c], cmap="gray", origin="lower")
        axes[r, 0].set_title(label, loc="left", fontsize=9)
    return _save(fig, path)


def save_fsc_plot(path: str | Path, shells: np.ndarray, fsc: np.ndarray, resolution_A: np.ndarray,
                  title: str) -> Path:
    """FSC against spatial frequency (1/Å), with the 0.5 and 0.143 thresholds."""
    fig, ax = plt.subplots(figsize=(6, 4))
    freq = np.where(shells > 0, 1 / resolution_A, 0.0)
    ax.plot(freq, fsc, "-o", markersize=3)
    for threshold in (0.5, 0.143):
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="spatial frequency (1/Å)", ylabel="FSC", ylim=(-0.1, 1.05), title=title)
    return _save(fig, path)


def save_loss_plot(path: str | Path, metrics: list[dict]) -> Path:
    """Full-data loss of each half-set per epoch (log scale)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for half in sorted({m["half"] for m in metrics}):
        rows = [m for m in metrics if m["half"] == half and m["loss"] is not None]
        ax.semilogy([m["epoch"] for m in rows], [m["loss"] for m in rows], "-o", label=f"half {half}")
    ax.set(xlabel="epoch", ylabel="loss", title="loss per epoch")
    ax.legend()
    return _save(fig, path)


def save_curves(path: str | Path, x: np.ndarray, curves: dict[str, np.ndarray], *, xlabel: str, ylabel: str,
                title: str, log: bool = False, markers: dict[str, tuple] | None = None) -> Path:
    """Labelled curves over a common x (lines), plus labelled point sets ``{label: (x, y)}``."""
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig, ax = plt.subplots(figsize=(7, 3.5))
    rows, columns = values.shape
    image = ax.imshow(values, aspect="auto", origin="lower", vmin=vmin, vmax=vmax, cmap="viridis",
                      extent=(first_column - 0.5, first_column + columns - 0.5, -0.5, rows - 0.5))
    fig.colorbar(image, ax=ax)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def write_lines(path: str | Path, lines: list[str]) -> Path:
    """Write text lines atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in lines))
    return Path(path)
