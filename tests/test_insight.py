"""The insight callback: a default names run writes the notebook's pictures and TensorBoard
entries, with the right layers, weights and character labels."""

from __future__ import annotations

import pytest
import torch
from conftest import image_file, run_training
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from genlab.run.checkpoints import load_model
from genlab.insight import pca_2d, window_means

SMALL = ["trainer.max_steps=400", "val_every=200", "loop.updates_per_step=100", "callbacks.insight.every_n_steps=200"]


def events(run):
    return EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "histograms": 0}).Reload()


def test_window_means_and_pca():
    assert window_means([1, 2, 3, 4, 5, 6, 7], 3) == ([3, 6], [2.0, 5.0])
    vectors = torch.randn(30, 5) @ torch.diag(torch.tensor([5.0, 3.0, 0.1, 0.1, 0.1]))
    points = pca_2d(vectors)
    assert points.shape == (30, 2)
    assert points.var(0).sum() > 0.95 * (vectors - vectors.mean(0)).var(0).sum()  # the two wide directions kept
    assert pca_2d(torch.randn(4, 1)).shape == (4, 2)


@pytest.mark.parametrize("model", ["mlp", "wavenet", "rnn"])
def test_a_names_run_writes_the_pictures_of_its_tanh_layers(model, names_file, tmp_path):
    run = tmp_path / "run"
    run_training(run, [f"model={model}", f"data.path={names_file}", *SMALL])
    written = {p.name for p in (run / "insight").iterdir()}
    assert {"loss_curves.png", "update_ratio.png", "activations.png", "embedding.png"} <= written
    assert all(image_file(run / "insight" / name).format == "PNG" for name in written)

    trained, _ = load_model(run / "checkpoints" / "last.ckpt")
    layers = set(trained.tanh_layers())
    assert layers == {"mlp": {"hidden"}, "wavenet": {"level1", "level2", "level3"}, "rnn": {"rnn.layer1"}}[model]
    tags = events(run).Tags()
    saturated = {t.rsplit("/", 1)[1] for t in tags["scalars"] if t.startswith("network/saturated/")}
    assert saturated == layers
    assert {f"network/activation/{name}" for name in layers} <= set(tags["histograms"])
    matrices = {n for n, p in trained.named_parameters() if p.dim() >= 2}
    ratios = {t.split("/", 2)[2] for t in tags["scalars"] if t.startswith("network/update_ratio_log10/")}
    assert ratios == matrices
    steps = [e.step for e in events(run).Scalars(f"network/update_ratio_log10/{sorted(matrices)[0]}")]
    assert steps == [200, 400]
    assert {"network/loss_curves", "network/embedding", "network/activations"} <= set(tags["images"])
    # TensorBoard's Time Series groups cards by the part of the tag before "/", in name order, and
    # opens the first groups: the losses come first, all the insight cards in one group of their own
    every_tag = [t for kind in ("scalars", "images", "histograms") for t in tags[kind]]
    groups = sorted({t.split("/", 1)[0] for t in every_tag})
    assert groups[0] == "loss" and {"loss/train", "loss/val", "loss/best_val", "loss/test"} <= set(tags["scalars"])
    assert "network" in groups and not any(g.startswith(("insight", "hp")) for g in groups)

    # the projector: one label per character of the vocabulary, in token order
    labels = next((run / "tensorboard").rglob("metadata.tsv")).read_text().split("\n")[:-1]
    assert labels == [{"\n": "\\n", " ": "␣"}.get(c, c) for c in trained.hparams.tokenizer["chars"]]


def test_the_gpt_has_ratios_and_an_embedding_but_no_tanh(names_file, tmp_path):
    run = tmp_path / "run"
    run_training(run, ["model=gpt", f"data.path={names_file}", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
                       "trainer.max_steps=4", "val_every=2", "callbacks.insight.every_n_steps=2"])
    written = {p.name for p in (run / "insight").iterdir()}
    assert {"loss_curves.png", "update_ratio.png", "embedding.png"} <= written
    assert "activations.png" not in written


def test_the_bigram_table_is_drawn_with_counts_and_probabilities(names_file, tmp_path):
    run = tmp_path / "run"
    run_training(run, ["model=bigram", f"data.path={names_file}"])
    written = {p.name for p in (run / "insight").iterdir()}
    assert {"bigram_counts.png", "bigram_probs.png"} <= written
    assert {"network/bigram_counts", "network/bigram_probs"} <= set(events(run).Tags()["images"])


def test_insight_can_be_turned_off(names_file, tmp_path):
    run = tmp_path / "run"
    run_training(run, ["model=mlp", f"data.path={names_file}", "trainer.max_steps=200", "val_every=200",
                       "loop.updates_per_step=100", "callbacks.insight=null"])
    assert not (run / "insight").exists()
