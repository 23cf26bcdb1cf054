"""``embedding.png`` and TensorBoard's projector: the characters' embedding vectors in 2-D."""

from __future__ import annotations

from pathlib import Path

import torch

from genlab.results.figures import plt, save_figure
from genlab.insight.labels import character_labels


def pca_2d(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2): the two principal components (the vectors as they are when D <= 2)."""
    if vectors.shape[1] <= 2:
        return torch.nn.functional.pad(vectors, (0, 2 - vectors.shape[1]))
    centred = vectors - vectors.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def embedding_figure(model, out: Path, tb, step: int) -> Path | None:
    table = model.token_embeddings()
    labels = character_labels(model)
    if table is None or labels is None:
        return None
    vectors = table.weight.detach().float().cpu()
    points = pca_2d(vectors)
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.scatter(points[:, 0], points[:, 1], s=180, alpha=0.3)
    for (x, y), label in zip(points.tolist(), labels):
        ax.text(x, y, label, ha="center", va="center", fontsize=11)
    kind = "PCA of the" if vectors.shape[1] > 2 else "the"
    ax.set(title=f"Character embeddings ({kind} {vectors.shape[1]}-D vectors)")
    ax.grid(alpha=0.3)
    save_figure(fig, out / "embedding.png")
    if tb is not None:
        tb.add_embedding(vectors, metadata=labels, global_step=step, tag="characters")
    return out / "embedding.png"
