"""``lookalike eval``: retrieval metrics on held-out classes and a report (PNG + HTML).

The report holds the training curves (loss, collapse signals, R@1 over epochs, from
``metrics.jsonl``), an R@K bar chart, and a nearest-neighbour gallery of a few queries
(query, then its top matches framed green when the class matches, red otherwise).
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def nearest_neighbours(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out top-k of (N, D) unit vectors via FAISS inner product: (scores, ids), each (N, k)."""
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(emb, dtype=np.float32), k + 1)
    out_s, out_i = np.zeros((len(emb), k), np.float32), np.zeros((len(emb), k), np.int64)
    for q in range(len(emb)):
        keep = [j for j in range(k + 1) if ids[q, j] != q and ids[q, j] >= 0][:k]
        out_s[q, : len(keep)], out_i[q, : len(keep)] = scores[q, keep], ids[q, keep]
    return out_s, out_i


def write_report(out_dir: str | Path, *, metrics: dict[str, float], history: list[dict[str, Any]],
                 emb: np.ndarray, labels: np.ndarray, images: list[np.ndarray], class_names: list[str],
                 title: str, n_queries: int = 6, k: int = 5, seed: int = 0) -> dict[str, Path]:
    """Write ``report.png`` and ``report.html`` into ``out_dir``.

    Args:
        metrics: final retrieval metrics (recall@K, precision@1, r_precision, map@r).
        history: metrics.jsonl records (may be empty for a bare model).
        emb: (N, D) float32 unit embeddings of the evaluated images; labels (N,) int.
        images: (H, W, 3) uint8 thumbnails, indexable like ``emb`` (only queried ones are used).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    queries = rng.choice(len(emb), size=min(n_queries, len(emb)), replace=False)
    scores, ids = nearest_neighbours(emb, k)

    fig = plt.figure(figsize=(14, 4 + 1.6 * len(queries)))
    gs = fig.add_gridspec(2 + len(queries), k + 1, height_ratios=[3, 0.2] + [1.4] * len(queries))
    ax_loss = fig.add_subplot(gs[0, : (k + 1) // 3])
    ax_rec = fig.add_subplot(gs[0, (k + 1) // 3: 2 * (k + 1) // 3])
    ax_bar = fig.add_subplot(gs[0, 2 * (k + 1) // 3:])
    ep = [h["epoch"] for h in history if "train/loss" in h]
    if ep:
        trained = [h for h in history if "train/loss" in h]
        ax_loss.plot(ep, [h["train/loss"] for h in trained], color="C0", label="loss")
        ax_loss.set_ylabel("loss", color="C0")
        # the collapse signal lives in [-1, 1], the loss on its own scale: each gets its axis
        ax_cos = ax_loss.twinx()
        ax_cos.plot(ep, [h.get("train/mean_pairwise_cosine", float("nan")) for h in trained], color="C3",
                    linestyle="--", label="mean pairwise cosine")
        ax_cos.set_ylabel("mean pairwise cosine (collapse near 1)", color="C3", fontsize=8)
        ax_cos.set_ylim(min(0.0, ax_cos.get_ylim()[0]), 1.0)
        ax_loss.set_xlabel("epoch")
        ax_loss.legend(handles=ax_loss.lines + ax_cos.lines, fontsize=7)
    ax_loss.set_title("training loss / collapse signal")
    for split in ("test", "val"):
        pts = [(h["epoch"], h[f"{split}/recall@1"]) for h in history if f"{split}/recall@1" in h]
        if pts:
            ax_rec.plot([e for e, _ in pts], [100 * r for _, r in pts], marker="o", label=f"{split} R@1")
    ax_rec.set_xlabel("epoch")
    ax_rec.set_ylabel("R@1 (%)")
    ax_rec.set_title("Recall@1 on held-out classes")
    if ax_rec.lines:
        ax_rec.legend()
    rk = {kk: v for kk, v in metrics.items() if kk.startswith("recall@")}
    ax_bar.bar(list(rk), [100 * v for v in rk.values()], color="#4a7")
    for i, v in enumerate(rk.values()):
        ax_bar.text(i, 100 * v + 1, f"{100 * v:.1f}", ha="center")
    ax_bar.set_ylim(0, 105)
    ax_bar.set_title(f"R@K (MAP@R {100 * metrics.get('map@r', float('nan')):.1f})")
    for row, q in enumerate(queries):
        ax = fig.add_subplot(gs[2 + row, 0])
        ax.imshow(images[q])
        ax.set_title(f"query: {class_names[labels[q]][:22]}", fontsize=7)
        ax.axis("off")
        for j in range(k):
            ax = fig.add_subplot(gs[2 + row, 1 + j])
            nb = ids[q, j]
            ax.imshow(images[nb])
            ok = labels[nb] == labels[q]
            for s in ax.spines.values():
                s.set_edgecolor("green" if ok else "red")
                s.set_linewidth(3)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{class_names[labels[nb]][:16]}\n{scores[q, j]:.3f}", fontsize=6,
                         color="green" if ok else "red")
    fig.suptitle(title)
    fig.tight_layout()
    png = out / "report.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)

    confused_html = _confused_section(out, emb, labels, images, class_names)
    rows = "".join(f"<tr><td>{html.escape(kk)}</td><td>{100 * v:.2f}</td></tr>" for kk, v in metrics.items()
                   if isinstance(v, float) and kk != "num_queries")
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<h1>{html.escape(title)}</h1><table border=1 cellpadding=4><tr><th>metric</th><th>%</th></tr>{rows}</table>"
            f"<p>{int(metrics.get('num_queries', len(emb)))} queries, leave-one-out retrieval among held-out classes.</p>"
            f"<img src='report.png' style='max-width:100%'>{confused_html}")
    page_path = out / "report.html"
    page_path.write_text(page)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return {"png": png, "html": page_path}


def _confused_section(out: Path, emb: np.ndarray, labels: np.ndarray, images, class_names: list[str],
                      top: int = 10, gallery: int = 5) -> str:
    """The class pairs retrieval confuses most: an HTML table, and ``confused.png`` with one
    example per pair (a query, then its nearest neighbour of the other class)."""
    import matplotlib.pyplot as plt

    from training.confusable import confused_pairs

    pairs = confused_pairs(emb, labels, top=top)
    if not pairs:
        return "<h2>Most confused classes</h2><p>none: every query's nearest neighbour has its class.</p>"
    (out / "confused.json").write_text(json.dumps(
        [{"class_a": class_names[a], "class_b": class_names[b], "votes": v} for a, b, v in pairs], indent=2) + "\n")
    _, ids = nearest_neighbours(emb, 1)
    nb = ids[:, 0]
    shown = pairs[:gallery]
    fig, axes = plt.subplots(len(shown), 2, figsize=(4.4, 2.2 * len(shown)), squeeze=False)
    for row, (a, b, v) in enumerate(shown):
        q = next(i for i in range(len(labels)) if {int(labels[i]), int(labels[nb[i]])} == {a, b})
        for col, idx in enumerate((q, nb[q])):
            ax = axes[row, col]
            ax.imshow(images[idx])
            ax.set_title(("query: " if col == 0 else "nearest: ") + class_names[int(labels[idx])][:24], fontsize=7,
                         color="black" if col == 0 else "red")
            ax.axis("off")
    fig.suptitle("most confused class pairs: a query and its nearest neighbour", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "confused.png", dpi=80)
    plt.close(fig)
    rows = "".join(f"<tr><td>{html.escape(class_names[a])}</td><td>{html.escape(class_names[b])}</td><td>{v}</td></tr>"
                   for a, b, v in pairs)
    return ("<h2>Most confused classes</h2><p>A query whose nearest neighbour is of another class is one vote for "
            "that pair.</p><table border=1 cellpadding=4><tr><th>class</th><th>confused with</th><th>votes</th></tr>"
            f"{rows}</table><img src='confused.png'>")
