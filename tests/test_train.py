"""End to end through the same code as ``python train.py`` / ``python sample.py``."""

import ctypes
import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, assert_learned, compose_config, run_training
from genlab.errors import DataError
from genlab.cli.sample import sample
from genlab.run.runtime import NVML_CHECK, skip_failing_nvml_check
from genlab.cli.train import CONF_DIR, train

TINY = {
    "bigram": ["model=bigram"],
    # the notebook trains its bigram network at a large rate (SGD 50): at AdamW's 3e-3 it barely moves in a short run
    "bigram-gradient": ["model=bigram", "model.counting=false", "optimizer.lr=0.1"],
    "mlp": ["model=mlp", "model.n_hidden=32"],
    "wavenet": ["model=wavenet", "model.block_size=4", "model.n_hidden=16"],
    "rnn": ["model=rnn", "model.n_hidden=32"],
    "lstm": ["model=lstm", "model.n_hidden=32"],
    "gru": ["model=gru", "model.n_hidden=32"],
    "gpt": ["model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2"],
}


@pytest.mark.parametrize("name", TINY)
def test_a_few_training_steps_write_a_complete_run(name, names_file, tmp_path):
    run_dir = tmp_path / "run"
    overrides = TINY[name] + [f"data.path={names_file}", "data.batch_size=8", "loop.updates_per_step=10",
                              "trainer.max_steps=60", "val_every=20", "num_samples=5"]
    metrics = run_training(run_dir, overrides)
    assert set(metrics) >= {"val_loss", "best_val_loss", "test_loss", "steps", "train_seconds", "tokens_per_second"}
    assert_learned(metrics, run_dir)
    assert metrics["best_val_loss"] <= metrics["val_loss"]
    if name == "bigram":  # the counting model counts each training batch once: one pass
        assert metrics["steps"] == 240 // 8
    else:
        assert metrics["steps"] == 60
        assert metrics["tokens_per_second"] > 0
    assert 0 < metrics["update_seconds"] < metrics["train_seconds"]  # validation and set-up apart
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "checkpoints" / "best.ckpt").exists()
    assert len((run_dir / "samples.txt").read_text().splitlines()) == 5
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("name", [n for n in TINY if n != "bigram"])
def test_every_model_trains_on_text(name, text_file, tmp_path):
    sampling = ["data.sampling=sequential"] if name in ("rnn", "lstm", "gru") else []
    overrides = TINY[name] + sampling + ["data=divina", f"data.path={text_file}", "data.seq_len=16",
                                         "data.batch_size=4", "loop.updates_per_step=1", "trainer.max_steps=30",
                                         "val_every=15", "logger=none"]
    metrics = run_training(tmp_path / "run", overrides)
    assert metrics["steps"] == 30
    assert_learned(metrics, tmp_path / "run")
    assert metrics["test_loss"] is None  # no test split asked for


def test_updates_per_step_does_not_change_training(names_file, tmp_path):
    """K updates per Lightning step are the same K updates a plain loop makes, on the same batches."""
    common = [f"data.path={names_file}", "data.batch_size=8", "model=mlp", "model.n_hidden=32",
              "optimizer=sgd", "trainer.max_steps=45", "val_every=45", "num_samples=0", "logger=none"]
    weights = []  # 45 updates cross the end of the first pass over the data (30 batches)
    for k in (1, 5):
        run_dir = tmp_path / f"k{k}"
        run_training(run_dir, common + [f"loop.updates_per_step={k}"])
        state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert state["global_step"] == 45
        weights.append(state["state_dict"])
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-6), key


def test_sampling_from_a_checkpoint_alone(names_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", "data.batch_size=8", "loop.updates_per_step=10",
                           "trainer.max_steps=100", "val_every=50", "num_samples=0"])
    names_file.unlink()  # the data is gone: the checkpoint must be enough
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={run_dir}/checkpoints/last.ckpt", "num_samples=12",
                                           "top_k=5", f"out={tmp_path}/s.txt"])
    names = sample(cfg)
    assert len(names) == 12 and all(n and set(n) <= set("abcdefghijklmnopqrstuvwxyz-") for n in names)
    printed = capsys.readouterr().out
    assert "novelty:" in printed and "of the samples are not training names" in printed
    assert (tmp_path / "s.txt").read_text().startswith(names[0])


def test_missing_data_without_network_or_mirror_names_url_and_mirror(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.delenv("GENLAB_DATA_MIRROR", raising=False)
    cfg = compose_config(["paths.data_mirror=null"], tmp_path / "run")
    with pytest.raises(DataError) as err:
        train(cfg)
    message = str(err.value)
    assert "https://gist.githubusercontent.com/pdesterlich/2562329" in message
    assert "paths.data_mirror" in message and "GENLAB_DATA_MIRROR" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_train_py_writes_config_and_unknown_model_lists_the_models(names_file, tmp_path):
    run_dir = tmp_path / "cli"
    ok = subprocess.run(
        [sys.executable, "train.py", f"data.path={names_file}", "trainer.max_steps=200", "val_every=200",
         f"hydra.run.dir={run_dir}", "num_samples=3", "trainer.enable_progress_bar=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 200
    bad = subprocess.run([sys.executable, "train.py", "model=transformerz"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0
    assert "model/transformerz" in bad.stderr and "Available options" in bad.stderr
    assert "mlp" in bad.stderr and "bigram" in bad.stderr


def test_sampling_text_with_a_prompt(text_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(run_dir, ["model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data=divina",
                           f"data.path={text_file}", "data.seq_len=16", "data.batch_size=4",
                           "trainer.max_steps=20", "val_every=20", "logger=none"])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={run_dir}", "prompt=nel mezzo", "max_new_tokens=40",
                                           "num_samples=2", "temperature=0.8", "top_k=5"])
        texts = sample(cfg)
        assert len(texts) == 2 and all(t.startswith("nel mezzo") and len(t) == len("nel mezzo") + 40 for t in texts)
        bad = compose("sample", overrides=[f"ckpt_path={run_dir}", "prompt='Nel mezzo!'"])
    from genlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"outside the model's vocabulary: \['!', 'N'\]"):
        sample(bad)


@pytest.mark.parametrize("data", ["divina", "shakespeare"])
def test_a_few_gpt_steps_on_the_real_text(data, mirror, tmp_path):
    metrics = run_training(tmp_path / "run", ["model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                                              f"data={data}", "data.seq_len=32", "data.batch_size=8",
                                              "loop.updates_per_step=1", "trainer.max_steps=20", "val_every=20",
                                              "logger=none", f"paths.data_mirror={mirror}"])
    assert metrics["steps"] == 20
    assert_learned(metrics, tmp_path / "run")


def test_gpt_trains_on_gpt2_tokens(text_file, mirror, tmp_path):
    metrics = run_training(tmp_path / "run", ["model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                                              "data=divina", f"data.path={text_file}", "data.tokenizer=gpt2",
                                              "data.seq_len=8", "data.batch_size=4", "loop.updates_per_step=1",
                                              "trainer.max_steps=5", "val_every=5", "logger=none",
                                              f"paths.data_mirror={mirror}"])
    assert metrics["steps"] == 5
    assert_learned(metrics, tmp_path / "run")  # V = 50,257: the model learns which few tokens the text uses


def test_trainer_gpu_without_cuda_says_so(names_file, tmp_path):
    from genlab.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the message is for machines without one")
    cfg = compose_config([f"data.path={names_file}", "trainer=gpu"], tmp_path / "run")
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*use trainer=cpu"):
        train(cfg)


@pytest.mark.slow
def test_compiled_model_checkpoints_without_compiler_prefixes(names_file, tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", "model=gpt", "model.n_layer=1", "model.n_embd=32",
                           "model.n_head=2", "loop.compile=true", "trainer.max_steps=10", "val_every=10",
                           "num_samples=3", "logger=none"])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={run_dir}", "num_samples=4"])
    assert len(sample(cfg)) == 4


def test_a_text_run_writes_continuations_of_the_validation_text_at_every_validation(text_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_training(run_dir, ["model=gpt", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "data=divina",
                           f"data.path={text_file}", "data.seq_len=16", "data.batch_size=4",
                           "trainer.max_steps=30", "val_every=10", "callbacks.samples.new_tokens=20"])
    samples = (run_dir / "samples.txt").read_text().split("\n\n---\n\n")
    validation_start = text_file.read_text()[int(len(text_file.read_text()) * 0.9):][:16]  # the prompt: 16 tokens
    assert len(samples) == 3 and all(s.startswith(validation_start) and len(s.rstrip("\n")) == 16 + 20 for s in samples)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [e.step for e in events.Tensors("samples/text_summary")] == [10, 20, 30]


def test_a_checkpoint_saved_under_the_older_names_loads_and_resumes(names_file, tmp_path):
    """model.context (the n-gram table) and contiguous are now block_size and sequential."""
    from genlab.run.checkpoints import load_model

    run = tmp_path / "run"
    common = ["model=bigram", "model.counting=false", "model.block_size=2", f"data.path={names_file}",
              "loop.updates_per_step=10", "val_every=10", "num_samples=0", "logger=none", "callbacks.insight=null"]
    run_training(run, [*common, "trainer.max_steps=10"])
    path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    hparams["context"], hparams["contiguous"] = hparams.pop("block_size"), hparams.pop("sequential")
    torch.save(checkpoint, path)

    model, _ = load_model(path)
    assert model.block_size == 2 and model.sequential is False
    metrics = run_training(run, [*common, "trainer.max_steps=20", f"ckpt_path={run}"])
    assert metrics["steps"] == 20


def test_training_clock_leaves_out_each_validation_until_training_goes_on(monkeypatch):
    from genlab import callbacks
    now = iter([0.0, 10.0, 14.0, 20.0, 30.0, 35.0])  # train start; val 10-14; val 20-30; end 35
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(now))
    clock = callbacks.TrainingClock()
    clock.on_train_start(None, None)
    clock.on_validation_start(None, None)
    clock.on_train_batch_start(None, None, None, 0)
    clock.on_validation_start(None, None)
    clock.on_train_batch_start(None, None, None, 1)
    clock.on_train_end(None, None)
    assert clock.seconds == 35 - 4 - 10


def test_the_nvml_check_that_lightning_turns_on_goes_where_nvml_cannot_load(monkeypatch):
    answer = torch.cuda.is_available()
    monkeypatch.setenv(NVML_CHECK, "1")  # as importing Lightning sets it

    def no_nvml(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_nvml)
    skip_failing_nvml_check()
    assert NVML_CHECK not in os.environ
    assert torch.cuda.is_available() == answer  # the same answer, from the CUDA runtime directly

    monkeypatch.setenv(NVML_CHECK, "1")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a machine with the NVIDIA driver: kept
    skip_failing_nvml_check()
    assert os.environ[NVML_CHECK] == "1"
