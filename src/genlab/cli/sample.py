"""``python sample.py ckpt_path=PATH``: sample from a trained model, from its checkpoint alone.

Names models print whole names (starting with ``prompt`` when one is given) and the share that is
new (not in the training list, which the checkpoint carries); text models continue ``prompt`` by
``max_new_tokens`` tokens; the DCGAN writes a grid of images (or, with ``interpolate=true``, a
walk between two noise vectors) into the checkpoint's run folder, or ``out=``; a run folder that
cannot be written (shared read-only) costs one line. Ctrl-C while text is generated prints what
was made so far."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from genlab.run.checkpoints import load_model
from genlab.run.checks import is_whole_number
from genlab.console import printable
from genlab.data.tokenizer import tokenizer_from_config
from genlab.errors import ConfigError, exit_on_user_error
from genlab.results.figures import image_grid, save_png
from genlab.run.outputs import atomic_write_text, save_result
from genlab.cli.overrides import checked_command_line
from genlab.run.runs import run_dir_of
from genlab.run.runtime import CONF_DIR, task_overrides

USAGE = """usage: python sample.py ckpt_path=<run folder | .ckpt file | last> [num_samples=20] [temperature=1.0]
                        [top_k=null] [seed=0] [prompt=TEXT] [max_new_tokens=500] [interpolate=false] [out=FILE]
                        [model_class=null] [trust_checkpoint=false]"""
MAX_NEW_TOKENS = 100_000  # a bound on what one command generates (a GPT on a CPU: minutes per thousand)
MAX_SAMPLES = 10_000


def check_sampling_args(cfg: DictConfig) -> None:
    if not cfg.get("ckpt_path"):
        raise ConfigError(f"ckpt_path is missing: which model should sample?\n{USAGE}")
    if not is_whole_number(cfg.num_samples) or not 1 <= cfg.num_samples <= MAX_SAMPLES:
        raise ConfigError(f"num_samples must be a whole number from 1 to {MAX_SAMPLES:,}, got {cfg.num_samples!r}")
    temperature = cfg.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ConfigError(f"temperature must be a finite number > 0 (1.0 samples the model as it is), got {temperature!r}")
    if cfg.top_k is not None and (not is_whole_number(cfg.top_k) or cfg.top_k < 1):
        raise ConfigError(f"top_k must be a whole number of tokens (at least 1) or null, got {cfg.top_k!r}")
    if not is_whole_number(cfg.max_new_tokens) or not 0 <= cfg.max_new_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"max_new_tokens must be a whole number from 0 to {MAX_NEW_TOKENS:,}, got {cfg.max_new_tokens!r}")
    if not is_whole_number(cfg.seed):
        raise ConfigError(f"seed must be a whole number, got {cfg.seed!r}")
    if cfg.out and Path(cfg.out).is_dir():
        raise ConfigError(f"out={cfg.out} is a folder; give a file name, e.g. out={Path(cfg.out) / 'samples.txt'}")


def sample(cfg: DictConfig) -> list[str] | Path:
    check_sampling_args(cfg)
    model, checkpoint = load_model(cfg.ckpt_path, trust=cfg.trust_checkpoint, named=cfg.model_class)
    check_options_apply(model.kind, cfg)
    if model.kind == "image":
        return sample_images(model, checkpoint, cfg)
    tokenizer = tokenizer_from_config(model.hparams.tokenizer, cfg.paths.data_mirror)
    prompt = "" if cfg.prompt is None else str(cfg.prompt)
    check_prompt(model, tokenizer, prompt)
    if tokenizer.eos_id is not None:  # names: whole names, each ended by the end token
        samples = sample_names(model, tokenizer, cfg.num_samples, cfg.seed, cfg.temperature, cfg.top_k, prompt)
        text = "\n".join(samples)
        known = set(checkpoint.get("genlab", {}).get("training_words") or [])
        if known:
            new = sum(s not in known for s in samples)
            text += f"\n\nnovelty: {new}/{len(samples)} = {new / len(samples):.0%} of the samples are not training names"
    else:
        samples = sample_text(model, tokenizer, cfg, prompt)
        text = "\n\n---\n\n".join(samples)
    print(printable(text))  # a vocabulary from a shared checkpoint may hold terminal escape sequences
    if cfg.out:
        save_result(lambda p: atomic_write_text(p, text + "\n"), Path(cfg.out), "the samples", chosen=True)
    return samples


# options that only one kind of model takes
ONLY_FOR = {"text": ("prompt", "temperature", "top_k", "max_new_tokens"), "image": ("interpolate",)}


def check_options_apply(kind: str, cfg: DictConfig) -> None:
    """Refuse an option given for another kind of model (``prompt=`` for the DCGAN)."""
    given = {o.lstrip("+~").split("=")[0] for o in task_overrides()}
    given |= {"prompt"} if cfg.prompt is not None else set()
    given |= {"interpolate"} if cfg.interpolate else set()
    for other, options in ONLY_FOR.items():
        if other != kind and (wrong := [o for o in options if o in given]):
            article = "an" if kind[0] in "aeiou" else "a"
            raise ConfigError(f"{', '.join(wrong)}: only for {other} models, and {cfg.ckpt_path} is {article} {kind} "
                              f"model's checkpoint; drop {' and '.join(w + '=' for w in wrong)}")


def check_prompt(model, tokenizer, prompt: str) -> None:
    if unknown := tokenizer.unknown_chars(prompt):
        raise ConfigError(
            f"the prompt has characters outside the model's vocabulary: {unknown}. "
            f"The vocabulary is {getattr(tokenizer, 'chars', '')!r}"
        )
    length = len(tokenizer.encode(prompt)) + (tokenizer.eos_id is not None)  # names: after the start token
    if model.reads_whole_context and length > model.block_size:
        raise ConfigError(f"the prompt has {length} tokens, more than the model's context of "
                          f"{model.block_size}; shorten it to at most that many")


def sample_names(model, tokenizer, num_samples: int, seed: int, temperature=1.0, top_k=None, prompt: str = "") -> list[str]:
    """Whole names from the start token to the end token, each beginning with ``prompt``."""
    start = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]] * num_samples, device=model.device)
    out = model.generate(
        start,
        max_new_tokens=max(model.seq_len, 1) * 2,
        temperature=temperature,
        top_k=top_k,
        eos_id=tokenizer.eos_id,
        generator=torch.Generator(model.device).manual_seed(seed),
    )
    names = []
    for row in out[:, 1:].tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        names.append(tokenizer.decode(row))
    return names


def sample_text(model, tokenizer, cfg: DictConfig, prompt: str) -> list[str]:
    """``num_samples`` continuations of ``prompt``; Ctrl-C keeps what was generated so far."""
    ids = tokenizer.encode(prompt) or [0]
    out = torch.tensor([ids] * cfg.num_samples, dtype=torch.long)
    stream = model.generate_stream(out, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_k=cfg.top_k, generator=torch.Generator().manual_seed(cfg.seed))
    try:
        for out in stream:
            pass
    except KeyboardInterrupt:
        print(f"(interrupted: the {out.shape[1] - len(ids)} tokens generated so far)", file=sys.stderr)
    start = len(ids) if prompt else 1
    return [prompt + tokenizer.decode(row[start:]) for row in out.tolist()]


def continue_text(model, tokenizer, ids: list[int], num_samples: int, max_new_tokens: int, seed: int) -> list[str]:
    """``num_samples`` continuations of the token ids ``ids`` (prompt included), as training shows them."""
    start = torch.tensor([ids] * num_samples, dtype=torch.long, device=model.device)
    out = model.generate(start, max_new_tokens, generator=torch.Generator(model.device).manual_seed(seed))
    return [tokenizer.decode(row) for row in out.tolist()]


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
    out = Path(cfg.out) if cfg.out else run_dir_of(Path(checkpoint["path"])) / name
    if save_result(lambda p: save_png(image_grid(images, nrow=nrow), p), out, f"the {len(images)} images",
                   chosen=bool(cfg.out)):
        print(f"wrote {len(images)} images to {out}")
    return out


@checked_command_line("sample")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    sample(cfg)
