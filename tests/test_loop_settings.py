"""conf/loop: the update loop's settings, given once for every model, not among any model's."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, compose_config, run_training

from genlab.run.checkpoints import load_model, read_checkpoint
from genlab.errors import ConfigError
from genlab.run.plan import identity_of, resolve
from genlab.loop.steps import LOOP_KEYS, LoopSettings
from genlab.cli.train import build_model, train
from genlab.data.module import ready

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
CLIPPED = {"gpt", "rnn", "lstm", "gru"}  # their YAMLs pick loop/clipped


@pytest.mark.parametrize("model", MODELS)
def test_every_model_gets_the_loop_from_its_group_not_its_yaml(model, tmp_path):
    data = "data=celeba" if model == "dcgan" else "data=names"
    cfg = compose_config([f"model={model}", data], tmp_path / "run")
    assert not set(LOOP_KEYS) & set(cfg.model), f"conf/model/{model}.yaml repeats a loop setting"
    assert cfg.loop.grad_clip == (1.0 if model in CLIPPED else None)
    assert cfg.loop.updates_per_step == "auto" and cfg.loop.compile is False
    given = compose_config([f"model={model}", data, "loop.grad_clip=0.5", "loop.compile=true"], tmp_path / "run")
    assert given.loop.grad_clip == 0.5 and given.loop.compile is True  # the command line wins over the model's


def test_the_model_built_for_a_run_carries_the_loop_and_keeps_it_out_of_its_hyperparameters(names_file, tmp_path):
    cfg = resolve(compose_config([f"data.path={names_file}", "loop.grad_clip=0.25", "loop.updates_per_step=5"],
                                 tmp_path / "run")).cfg
    from genlab.errors import instantiate

    model = build_model(cfg, ready(instantiate(cfg.data)))
    assert model.loop == LoopSettings(updates_per_step=5, grad_clip=0.25, compile=False)
    assert not set(LOOP_KEYS) & set(model.hparams)


def test_a_checkpoint_written_when_the_loop_was_the_models_still_loads_and_resumes(names_file, tmp_path):
    run_dir = tmp_path / "run"
    tiny = [f"data.path={names_file}", "model.n_hidden=16", "loop.updates_per_step=5", "val_every=10",
            "num_samples=0", "logger=none"]
    run_training(run_dir, [*tiny, "trainer.max_steps=10"])
    for name in ("last.ckpt", "best.ckpt"):  # as an earlier genlab wrote them: the loop among the model's settings
        path = run_dir / "checkpoints" / name
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["hyper_parameters"].update(updates_per_step=5, grad_clip=None, compile=False)
        torch.save(checkpoint, path)
    model, _ = load_model(run_dir / "checkpoints" / "last.ckpt")
    assert model.loop == LoopSettings() and not set(LOOP_KEYS) & set(model.hparams)
    resumed = run_training(run_dir, [*tiny, "trainer.max_steps=20", f"ckpt_path={run_dir}"])
    assert resumed["status"] == "completed" and read_checkpoint(run_dir)["global_step"] == 20


def test_a_plan_recorded_when_the_loop_was_the_models_is_the_same_plan():
    now = {"model": {"n_hidden": 16}, "loop": {"updates_per_step": "auto", "grad_clip": 1.0, "compile": False}}
    before = {"model": {"n_hidden": 16, "updates_per_step": "auto", "grad_clip": 1.0, "compile": False}}
    assert identity_of(before, "data") == identity_of(now, "data")
    assert identity_of(before, "data") != identity_of({**now, "loop": {**now["loop"], "grad_clip": 0.5}}, "data")


@pytest.mark.parametrize("override, pattern", [
    ("loop.updates_per_step=0", "loop.updates_per_step must be a whole number of at least 1, got 0"),
    ("loop.grad_clip=-1", "loop.grad_clip must be a positive finite number .* or null .*, got -1"),
    ("loop.grad_clip=nan", "loop.grad_clip must be a positive finite number"),
    ("loop.compile=fast", "loop.compile=fast: use false, true or one of torch.compile's modes"),
])
def test_loop_values_that_cannot_work_are_refused_before_anything_is_written(override, pattern, names_file, tmp_path):
    with pytest.raises(ConfigError, match=pattern):
        train(compose_config([f"data.path={names_file}", override], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_model_that_makes_one_update_per_step_refuses_more(tmp_path):
    from PIL import Image

    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(faces / f"{i}.png")
    cfg = compose_config(["model=dcgan", "data=celeba", f"data.root={faces}", "data.image_size=8",
                          "data.num_workers=0", "data.batch_size=2", "loop.updates_per_step=4"], tmp_path / "run")
    with pytest.raises(ConfigError, match="loop.updates_per_step=4: this model makes one update per Lightning step"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()
