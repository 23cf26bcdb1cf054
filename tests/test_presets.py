"""Every preset of conf/experiment/ composes and trains: two updates on its real data (faces: a few
made-up images) with the network shrunk, through the same code as ``python train.py experiment=...``."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_config, run_training
from PIL import Image

from genlab.run.checkpoints import load_model
from genlab.cli.train import CONF_DIR

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))

# per network, the overrides that make it tiny (sizes only: what the preset sets up otherwise stays)
TINY = {
    "GPT": ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "data.seq_len=16"],
    "Recurrent": ["model.n_hidden=16"],
    "MLP": ["model.n_hidden=16"],
    "WaveNet": ["model.n_hidden=16"],
    "Bigram": ["data.batch_size=512"],  # counting makes one pass whatever max_steps says: few batches
    "DCGAN": ["model.ngf=8", "model.ndf=8", "model.grid_every=1", "data.num_workers=0"],
}


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faces")
    generator = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = torch.randint(0, 256, (40, 32, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_every_preset_is_tested():
    assert len(PRESETS) >= 9 and {"notebook_mlp", "divina_gpt_cpu", "notebook_dcgan"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_trains_two_updates(preset, faces, tmp_path, mirror):
    composed = compose_config([f"experiment={preset}"], tmp_path / "probe")
    network = hydra.utils.get_class(composed.model._target_).__name__
    batch = [] if network == "Bigram" else ["data.batch_size=4"]
    overrides = [f"experiment={preset}", *TINY[network], *batch, "trainer.max_steps=2", "val_every=2", "num_samples=2"]
    if network == "DCGAN":
        overrides.append(f"data.root={faces}")
    else:
        overrides.append("loop.updates_per_step=1")
    metrics = run_training(tmp_path / "run", overrides)
    assert metrics["status"] == "completed"
    assert metrics["steps"] == 2 or (network == "Bigram" and metrics["steps"] > 2)  # counting: one pass
    # what genlab writes is data alone: the safe unpickler loads it, and the model comes back from it
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint) == []
    model, _ = load_model(checkpoint)
    assert type(model).__name__ == network
