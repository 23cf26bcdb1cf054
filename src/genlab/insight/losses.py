"""``loss_curves.png``: every update's training loss, its window means, and the validation loss."""

from __future__ import annotations

from pathlib import Path

from genlab.results.figures import plt, save_figure


def window_means(values: list[float], window: int) -> tuple[list[float], list[float]]:
    """Means of consecutive windows of ``window`` values, placed at each window's last index."""
    xs, ys = [], []
    for start in range(0, len(values) - window + 1, window):
        xs.append(start + window)
        ys.append(sum(values[start : start + window]) / window)
    return xs, ys


def loss_figure(train_losses: list[tuple[int, float]], val_losses: list[tuple[int, float]], window: int | None,
                out: Path) -> Path | None:
    """``window``: updates per point of the smoothed curve; None: a fiftieth of the run."""
    if not train_losses:
        return None
    steps, losses = zip(*train_losses)
    window = window or max(1, len(losses) // 50)
    means = window_means(list(losses), window)
    curves = {"train (every update)": (steps, losses),
              f"train (mean of {window} updates)": ([steps[i - 1] for i in means[0]], means[1])}
    if val_losses:
        curves["validation"] = tuple(zip(*val_losses))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, (xs, ys)), style in zip(curves.items(), [dict(alpha=0.25, lw=0.5), dict(lw=1.5), dict(marker="o", lw=1.5)]):
        ax.plot(xs, ys, label=label, **style)
    ax.set(xlabel="update", ylabel="loss (nats per token)", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out / "loss_curves.png")
    return out / "loss_curves.png"
