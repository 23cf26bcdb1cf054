"""``activations.png`` and ``network/saturated/<layer>``: the tanh layers a model declares
(``tanh_layers()``), looked at on a fixed batch of validation sequences in eval mode."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from genlab.results.figures import plt, save_figure
from genlab.insight.board import add_histogram

SATURATED = 0.97  # |tanh| above this passes almost no gradient: 1 - 0.97^2 = 0.06


class ActivationProbe:
    """A fixed batch ``x`` (B, T) and the positions that predict a real character (not padding)."""

    def __init__(self, x: torch.Tensor, real: torch.Tensor):
        self.x, self.real = x, real

    def at_targets(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (N, C): the positions that predict a real character. A layer's positions
        end where the sequence does (the WaveNet's lower levels also cover the start padding)."""
        return t.float().cpu()[:, -self.real.shape[1]:][self.real]

    @torch.no_grad()
    def measure(self, model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Pre-activations and activations of each tanh layer, in eval mode."""
        seen, hooks = {}, []

        def keep(name):
            def hook(module, inputs, output):
                if isinstance(module, nn.Tanh):
                    seen[name] = (self.at_targets(inputs[0]), self.at_targets(output))
                else:  # a vanilla nn.RNN (as tanh_layers() allows): its outputs are tanh(pre-activation)
                    out = self.at_targets(output[0])
                    seen[name] = (torch.atanh(out.clamp(-1 + 1e-6, 1 - 1e-6)), out)
            return hook

        for name, module in model.tanh_layers().items():
            hooks.append(module.register_forward_hook(keep(name)))
        was_training = model.training
        model.eval()
        try:
            model(self.x)
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        return seen


def saturation(activations: torch.Tensor) -> float:
    return (activations.abs() > SATURATED).float().mean().item()


def log_activations(layers: dict, model, tb, step: int, histograms: bool) -> None:
    """At update ``step`` (which need not end a Lightning step): written to the loggers directly."""
    saturated = {f"network/saturated/{name}": saturation(post) for name, (pre, post) in layers.items()}
    for logger in model.loggers:
        logger.log_metrics(saturated, step=step)
    for name, (pre, post) in layers.items():
        if tb is not None and histograms:
            add_histogram(tb, f"network/preactivation/{name}", pre, step)
            add_histogram(tb, f"network/activation/{name}", post, step)


def activation_figure(layers: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, (pre, post) in layers.items():
        axes[0].hist(pre.flatten().numpy(), bins=80, histtype="step", density=True, label=name)
        axes[1].hist(post.flatten().numpy(), bins=80, histtype="step", density=True,
                     label=f"{name}: {saturation(post):.1%} saturated")
    axes[0].set(title="pre-activations", xlabel="value")
    axes[1].set(title=f"tanh activations (saturated: |tanh| > {SATURATED})", xlabel="value")
    for ax in axes:
        ax.legend()
    save_figure(fig, out / "activations.png")
    return out / "activations.png"
