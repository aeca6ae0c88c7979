"""The eval report's plots: collapse signal on its own axis, R@1 in percent, labelled neighbours."""

from __future__ import annotations

import numpy as np


def test_report_axes(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from training.report import write_report

    figs = []
    real = Figure.savefig

    def keep(self, *a, **kw):
        figs.append(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    emb = rng.normal(size=(20, 8)).astype(np.float32) + 3 * np.eye(8, dtype=np.float32)[labels]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    history = [{"epoch": 0, "test/recall@1": 0.40},
               {"epoch": 1, "train/loss": 2.5, "train/mean_pairwise_cosine": 0.3, "test/recall@1": 0.55},
               {"epoch": 2, "train/loss": 1.5, "train/mean_pairwise_cosine": 0.2, "test/recall@1": 0.65}]
    images = [np.full((8, 8, 3), 40 * c, np.uint8) for c in labels]
    names = ["gull", "tern", "wren", "crow"]
    write_report(tmp_path, metrics={"recall@1": 0.65, "map@r": 0.3, "num_queries": 20.0}, history=history, emb=emb,
                 labels=labels, images=images, class_names=names, title="t", n_queries=2, k=3)
    fig = figs[0]
    by_title = {ax.get_title(): ax for ax in fig.axes}
    loss_ax = by_title["training loss / collapse signal"]
    twins = [ax for ax in fig.axes if ax is not loss_ax and ax.bbox.bounds == loss_ax.bbox.bounds]
    assert twins and "cosine" in twins[0].get_ylabel()  # its own axis, not the loss's
    assert [line.get_label() for line in loss_ax.lines] == ["loss"]
    rec = by_title["Recall@1 on held-out classes"]
    assert max(rec.lines[0].get_ydata()) == 65.0 and rec.get_ylabel() == "R@1 (%)"
    neighbour_titles = [ax.get_title() for ax in fig.axes if "\n" in ax.get_title()]
    assert len(neighbour_titles) == 2 * 3
    assert all(t.split("\n")[0] in names for t in neighbour_titles)
