"""Resume exactly, stop cleanly on a signal, refuse bad checkpoints, repeat runs exactly."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, compose_config, run_training
from genlab.errors import CheckpointError
from genlab.train import train

MODELS = {
    "mlp": ["model=mlp", "model.n_hidden=32", "model.updates_per_step=10"],
    "lstm": ["model=lstm", "model.n_hidden=32", "model.dropout=0.2", "model.updates_per_step=10", "data=divina", "data.sampling=sequential",
             "data.block_size=16", "data.batch_size=4"],
    "gpt": ["model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.dropout=0.2",
            "data=divina", "data.block_size=16", "data.batch_size=4"],
}


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("name", MODELS)
def test_resume_continues_exactly(name, names_file, text_file, tmp_path):
    data = [f"data.path={text_file if 'data=divina' in MODELS[name] else names_file}"]
    common = MODELS[name] + data + ["scheduler=step", "scheduler.milestones=[150]", "val_every=50",
                                    "num_samples=0", "logger=csv"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(straight, common + ["trainer.max_steps=200"])
    run_training(resumed, common + ["trainer.max_steps=100"])
    metrics = run_training(resumed, common + ["trainer.max_steps=200", f"ckpt_path={resumed}"])
    assert metrics["steps"] == 200
    a, b = weights(straight), weights(resumed)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), f"{key} differs after resuming"


def test_a_checkpoint_of_another_model_is_refused(names_file, tmp_path):
    run_dir = tmp_path / "mlp"
    run_training(run_dir, [f"data.path={names_file}", "model.updates_per_step=10", "trainer.max_steps=20",
                           "val_every=20", "num_samples=0", "logger=none"])
    cfg = compose_config([f"data.path={names_file}", "model=gpt", f"ckpt_path={run_dir}"], tmp_path / "gpt")
    with pytest.raises(CheckpointError, match="holds a MLP model.*is a GPT"):
        train(cfg)


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", None])
def test_unreadable_checkpoints_are_refused(content, names_file, tmp_path):
    bad = tmp_path / "bad.ckpt"
    if content is None:  # a real checkpoint cut short, as by a killed copy
        run_training(tmp_path / "run", [f"data.path={names_file}", "model.updates_per_step=10",
                                        "trainer.max_steps=20", "val_every=20", "num_samples=0", "logger=none"])
        content = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()[:2000]
    bad.write_bytes(content)
    cfg = compose_config([f"data.path={names_file}", f"ckpt_path={bad}"], tmp_path / "new")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(cfg)
    assert not (tmp_path / "new" / "metrics.json").exists()


def test_same_seed_same_metrics_and_seed_zero_is_valid(names_file, tmp_path):
    common = [f"data.path={names_file}", "model.updates_per_step=10", "trainer.max_steps=60", "val_every=30",
              "num_samples=0", "logger=none", "seed=0", "data.seed=0"]
    first = run_training(tmp_path / "a", common)
    second = run_training(tmp_path / "b", common)
    for key in ("val_loss", "best_val_loss", "test_loss", "steps"):
        assert first[key] == second[key]


def test_sigint_saves_a_checkpoint_prints_the_resume_command_and_resumes(names_file, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "train.py", f"data.path={names_file}", "model.updates_per_step=10",
            "trainer.max_steps=100000000", "val_every=100000", "num_samples=0", f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(run_dir.glob("tensorboard/events*")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # some training
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "stopped by SIGINT at step" in err and f"ckpt_path={run_dir}" in err
    assert not (run_dir / "metrics.json").exists()  # an interrupted run has no final metrics
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] > 0
    command = err.split("Resume with:")[1].strip().split()
    resume = [sys.executable, *command[1:]]
    resume = [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={saved['global_step'] + 20}"
              for a in resume]
    done = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == saved["global_step"] + 20
