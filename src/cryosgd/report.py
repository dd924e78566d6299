"""Pictures for people: image montages (matplotlib, Agg backend), written atomically."""

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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
