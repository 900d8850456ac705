"""The evaluation's pictures, labelled in the picture itself (column titles, what each row shows, what an error
map means), drawn with matplotlib so a grid read on its own, away from report.md, still says what it is."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mavilt.storage import Location


@dataclass(frozen=True)
class Column:
    title: str
    cmap: str = "gray"  # gray for images; an error map gets a colour scale with its range
    vmax: float = 1.0


ERROR_SCALE = 0.25  # |input - reconstruction| shown on 0..0.25 of the intensity range: small errors stay visible


def save_grid(rows: Sequence[Sequence[np.ndarray]], columns: Sequence[Column], path, *, title: str,
              row_labels: Sequence[str] | None = None, note: str | None = None) -> Location:
    """Rows of [H, W] images in [0, 1] under column titles, each row labelled on its left, a title above and an
    optional note below; written as PNG to a local path or a URI."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(columns)
    label_width = 1.6 if row_labels else 0.0
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(label_width + 1.7 * n_cols, 0.5 + 1.7 * n_rows + (0.3 if note else 0)),
                             squeeze=False, dpi=100, layout="constrained")
    for r, row in enumerate(rows):
        for c, (image, col) in enumerate(zip(row, columns)):
            ax = axes[r][c]
            shown = ax.imshow(np.asarray(image, np.float32), cmap=col.cmap, vmin=0.0, vmax=col.vmax,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col.title, fontsize=8)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center", labelpad=4)
            if col.cmap != "gray" and r == n_rows - 1:
                bar = fig.colorbar(shown, ax=[axes[i][c] for i in range(n_rows)], fraction=0.05, pad=0.02)
                bar.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    if note:
        fig.supxlabel(note, fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return Location.of(path).write_bytes(buf.getvalue())


def positive_findings(labels: dict[str, int | None], limit: int = 2) -> str:
    """A row label: the study's positive findings (the first ``limit``), or 'no finding'."""
    found = [o for o, v in labels.items() if v == 1 and o != "No Finding"]
    if not found:
        return "no finding"
    shown = ", ".join(found[:limit]) + (f" +{len(found) - limit}" if len(found) > limit else "")
    return shown.replace(", ", ",\n")
