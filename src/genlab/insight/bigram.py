"""``bigram_counts.png``, ``bigram_probs.png``: the square count table a model declares
(``count_table()``), each cell annotated with its character pair and value."""

from __future__ import annotations

from pathlib import Path

from genlab.results.figures import plt, save_figure
from genlab.insight.labels import character_labels


def bigram_figures(model, out: Path) -> list[Path]:
    counts = model.count_table()
    labels = character_labels(model)
    if counts is None or labels is None:
        return []
    counts = counts.detach().cpu()
    smoothing = model.hparams.get("smoothing", 0.0)
    probs = (counts + smoothing) / (counts + smoothing).sum(1, keepdim=True)
    paths = []
    for name, table, fmt, title in (("bigram_counts", counts, "{:.0f}", "Bigram counts (row: this character, column: the next)"),
                                    ("bigram_probs", probs, "{:.2f}", "P(next | this), rows normalised")):
        size = len(labels)
        fig, ax = plt.subplots(figsize=(size * 0.55, size * 0.55))
        ax.imshow(table.numpy(), cmap="Blues")
        for i in range(size):
            for j in range(size):
                ax.text(j, i, labels[i] + labels[j], ha="center", va="bottom", color="gray", fontsize=6)
                ax.text(j, i, fmt.format(table[i, j].item()), ha="center", va="top", color="gray", fontsize=6)
        ax.set_xticks(range(size), labels)
        ax.set_yticks(range(size), labels)
        ax.set_title(title)
        save_figure(fig, out / f"{name}.png")
        paths.append(out / f"{name}.png")
    return paths
