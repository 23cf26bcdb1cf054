"""``python sample.py ckpt_path=PATH``: sample from a trained model, from its checkpoint alone.

Names models print whole names and the share that is new (not in the training list, which the
checkpoint carries); text models continue ``prompt`` by ``max_new_tokens`` tokens; the DCGAN
writes a grid of images (or, with ``interpolate=true``, a walk between two noise vectors)."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from genlab.checkpoints import load_model
from genlab.data.tokenizer import tokenizer_from_config
from genlab.errors import ConfigError, exit_on_user_error
from genlab.figures import image_grid, save_png
from genlab.outputs import atomic_write_text
from genlab.train import CONF_DIR, sample_names


def check_sampling_args(cfg: DictConfig) -> None:
    if cfg.num_samples <= 0:
        raise ConfigError(f"num_samples must be at least 1, got {cfg.num_samples}")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature must be > 0 (1.0 samples the model as it is), got {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k <= 0:
        raise ConfigError(f"top_k must be a positive number of tokens or null, got {cfg.top_k}")


def sample(cfg: DictConfig) -> list[str] | Path:
    check_sampling_args(cfg)
    model, checkpoint = load_model(cfg.ckpt_path)
    if model.kind == "image":
        return sample_images(model, checkpoint, cfg)
    tokenizer = tokenizer_from_config(model.hparams.tokenizer, cfg.paths.data_mirror)
    if tokenizer.eos_id is not None and cfg.prompt is None:
        samples = sample_names(model, tokenizer, cfg.num_samples, cfg.seed, cfg.temperature, cfg.top_k)
        text = "\n".join(samples)
        known = set(checkpoint.get("genlab", {}).get("training_words") or [])
        if known:
            new = sum(s not in known for s in samples)
            text += f"\n\nnovelty: {new}/{len(samples)} = {new / len(samples):.0%} of the samples are not training names"
    else:
        samples = sample_text(model, tokenizer, cfg)
        text = "\n\n---\n\n".join(samples)
    print(text)
    if cfg.out:
        atomic_write_text(Path(cfg.out), text + "\n")
    return samples


def sample_text(model, tokenizer, cfg: DictConfig) -> list[str]:
    prompt = cfg.prompt or ""
    if unknown := tokenizer.unknown_chars(prompt):
        raise ConfigError(
            f"the prompt has characters outside the model's vocabulary: {unknown}. "
            f"The vocabulary is {getattr(tokenizer, 'chars', '')!r}"
        )
    ids = tokenizer.encode(prompt) or [0]
    if model.reads_whole_context and len(ids) > model.context_length:
        raise ConfigError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                          f"{model.context_length}; shorten it to at most that many")
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long)
    out = model.generate(
        idx,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    start = len(ids) if prompt else 1
    return [prompt + tokenizer.decode(row[start:]) for row in out.tolist()]


def sample_images(model, checkpoint: dict, cfg: DictConfig) -> Path:
    """A grid of ``num_samples`` generated images, or with ``interpolate=true`` a row of
    ``num_samples`` images on the straight line between two noise vectors; written as PNG."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.interpolate:
        if cfg.num_samples < 2:
            raise ConfigError(f"interpolate=true needs num_samples >= 2 (the two ends and the steps between), got {cfg.num_samples}")
        ends = model.noise(2, generator)
        weights = torch.linspace(0, 1, cfg.num_samples).view(-1, 1, 1, 1)
        z, nrow, name = (1 - weights) * ends[0] + weights * ends[1], cfg.num_samples, "interpolation.png"
    else:
        z, nrow, name = model.noise(cfg.num_samples, generator), 8, "samples.png"
    images = model.generate(z)
    out = Path(cfg.out) if cfg.out else Path(checkpoint["path"]).resolve().parent.parent / name
    save_png(image_grid(images, nrow=nrow), out)
    print(f"wrote {len(images)} images to {out}")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    sample(cfg)
