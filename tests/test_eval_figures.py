"""What a person looks at after an evaluation: labelled grids (matplotlib), the per-observation table and the
model card's limits taken from the measured numbers (no Ray, no model)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def test_a_grid_is_drawn_with_its_titles_and_row_labels(tmp_path):
    from mavilt.eval.figures import ERROR_SCALE, Column, positive_findings, save_grid

    rows = [[np.zeros((16, 16)), np.ones((16, 16)), np.full((16, 16), 0.1)] for _ in range(3)]
    labels = [positive_findings({"Cardiomegaly": 1, "Edema": 1, "Fracture": 1, "No Finding": None}),
              positive_findings({"No Finding": 1}), positive_findings({})]
    assert labels == ["Cardiomegaly,\nEdema +1", "no finding", "no finding"]
    path = save_grid(rows, [Column("image"), Column("reconstruction"), Column("error", cmap="magma", vmax=ERROR_SCALE)],
                     tmp_path / "grid.png", title="a title", row_labels=labels, note="what the error map shows")
    with Image.open(path.local_path) as im:
        w, h = im.size
        pixels = np.asarray(im.convert("RGB"))
    # Bigger than the bare 48x48 grid (titles, labels, a colour bar) and in colour where the error map is.
    assert w > 3 * 16 * 4 and h > 3 * 16 * 2
    assert (np.abs(pixels[..., 0].astype(int) - pixels[..., 2].astype(int)) > 30).any()


def test_the_model_card_lists_what_the_bundle_reads_poorly_from_the_numbers():
    from mavilt.eval.report import poorly_read

    per = {"Cardiomegaly": {"precision": 1.0, "recall": 0.6, "f1": 0.75, "support": 5},
           "Pneumothorax": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 51},
           "Edema": {"precision": 0.5, "recall": 0.4, "f1": 0.444, "support": 9},
           "Fracture": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}
    poor, unmeasured = poorly_read({"reports": {"systems": {"model": {"per_observation": per}}}})
    assert poor == ["Pneumothorax (F1 0.00 over 51 positives)", "Edema (F1 0.44 over 9 positives)"]
    assert unmeasured == ["Fracture"]
