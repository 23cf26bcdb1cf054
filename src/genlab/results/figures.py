"""Pictures a run writes as files: image grids, an animated GIF of grids, curves. Each is made in
memory and written atomically (``genlab.run.outputs``): a full disk leaves the previous picture whole
and ends the run with one message."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from genlab.run.outputs import atomic_write_bytes  # noqa: E402


def image_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> one (3, H', W') grid in [0, 1]."""
    return make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))


def _write_image(image: Image.Image, path: str | Path, **options) -> None:
    data = io.BytesIO()
    image.save(data, format=Path(path).suffix.lstrip(".").upper(), **options)
    atomic_write_bytes(path, data.getbuffer())


def save_png(grid: torch.Tensor, path: str | Path) -> None:
    """A (3, H, W) tensor in [0, 1] as a PNG."""
    pixels = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    _write_image(Image.fromarray(pixels), path)


def save_gif(frames: list[Path], path: str | Path, ms_per_frame: int = 400) -> None:
    """PNG files -> one looping animated GIF (the last frame held a little longer)."""
    images = [Image.open(frame).convert("RGB") for frame in frames]
    durations = [ms_per_frame] * (len(images) - 1) + [ms_per_frame * 4]
    _write_image(images[0], path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def save_figure(fig, path: str | Path) -> None:
    data = io.BytesIO()
    try:
        fig.savefig(data, format=Path(path).suffix.lstrip("."), dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, data.getbuffer())


def plot_curves(curves: dict[str, tuple[list, list]], path: str | Path, xlabel: str = "step",
                ylabel: str = "loss", title: str | None = None):
    """Named (x, y) curves on one axis, saved as PNG; returns the figure's path."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name, linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return Path(path)
