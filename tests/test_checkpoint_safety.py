"""Checkpoints one can pass around: loading a shared one runs nothing (torch's safe unpickler, the
model class looked up, never imported from the file), and a disk that fills while a checkpoint is
written leaves the previous one whole, ends the run with one message and resumes from it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, compose_config, run_training, snapshot
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from genlab.run.checkpoints import read_checkpoint
from genlab.errors import CheckpointError, ConfigError, DiskFull
from genlab.cli.evaluate import evaluate
from genlab.results.figures import plot_curves
from genlab.cli.sample import sample
from genlab.cli.train import CONF_DIR, train

TINY = ["model.n_hidden=16", "loop.updates_per_step=10", "num_samples=0", "logger=none"]


class RunsACommand:
    """Unpickling this runs a shell command that creates ``marker``: what a shared file can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """A checkpoint shaped like genlab's (in a run folder's checkpoints/) with the payload inside."""
    marker, path = tmp_path / "the-command-ran", tmp_path / "shared" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"genlab": {"class": "genlab.models.mlp.MLP", "extra": RunsACommand(marker)}, "state_dict": {},
                "global_step": 10}, path)
    return path, marker


def command_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def test_the_crafted_checkpoint_runs_its_command_when_trusted(crafted):
    """The payload is real: the explicit trusted path unpickles it, and the command runs."""
    path, marker = crafted
    read_checkpoint(path, trust=True)
    assert marker.exists()


@pytest.mark.parametrize("command", ["sample", "eval", "resume"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(command, crafted, names_file, tmp_path):
    path, marker = crafted
    before = snapshot(tmp_path)
    refusal = r"holds posix\.system, which torch's safe unpickler.*trust_checkpoint=true"
    with pytest.raises(CheckpointError, match=refusal):
        if command == "sample":
            sample(command_config("sample", [f"ckpt_path={path}"]))
        elif command == "eval":
            evaluate(command_config("eval", [f"ckpt_path={path}"]))
        else:
            train(compose_config([f"data.path={names_file}", f"ckpt_path={path}", *TINY], tmp_path / "run"))
    assert not marker.exists()
    assert snapshot(tmp_path) == before  # refused before anything was built or written (data, run folder)


def test_sample_py_refuses_it_with_one_message(crafted):
    """The command a user who was sent the file types."""
    path, marker = crafted
    done = subprocess.run([sys.executable, "sample.py", f"ckpt_path={path}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {path} is refused: it holds posix.system") and done.stderr.count("\n") == 1
    assert not marker.exists()


@pytest.fixture
def mlp_run(names_file, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", "trainer.max_steps=10", "val_every=10", *TINY])
    return run_dir


def test_a_checkpoint_naming_a_class_outside_genlab_is_refused_and_not_imported(mlp_run, tmp_path, monkeypatch):
    marker, library = tmp_path / "imported", tmp_path / "lib"
    library.mkdir()
    (library / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: pass\n")
    monkeypatch.syspath_prepend(str(library))
    path = mlp_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["genlab"]["class"] = "planted.Model"
    torch.save(checkpoint, path)
    for command in ("sample", "eval"):
        with pytest.raises(CheckpointError, match=r"'planted\.Model', which is not one of genlab's models.*"
                                                  r"name it yourself: model_class="):
            (sample if command == "sample" else evaluate)(command_config(command, [f"ckpt_path={path}"]))
    assert not marker.exists() and "planted" not in sys.modules
    # named by the user it is imported (their choice), and used only if it is a genlab model
    with pytest.raises(ConfigError, match=r"model_class=planted\.Model is not a genlab model"):
        sample(command_config("sample", [f"ckpt_path={path}", "model_class=planted.Model"]))


def test_eval_builds_only_genlab_data_modules_from_a_run_folder_it_was_given(mlp_run, tmp_path):
    """eval.py rebuilds the data from the run's recorded config, which Hydra instantiates: Hydra
    blocks some targets (os.system), not all (os.makedirs, which writes where the record says)."""
    marker, recorded = tmp_path / "made-by-the-record", mlp_run / ".hydra" / "config.yaml"
    config = OmegaConf.load(recorded)
    config.data.hook = {"_target_": "os.makedirs", "name": str(marker)}
    OmegaConf.save(config, recorded)
    with pytest.raises(CheckpointError, match=r"config\.yaml is refused: data\.hook names 'os\.makedirs' to build"):
        evaluate(command_config("eval", [f"ckpt_path={mlp_run}"]))
    assert not marker.exists()
    with pytest.raises(Exception):  # trusted, it is built as recorded: the folder is made (then the data fails)
        evaluate(command_config("eval", [f"ckpt_path={mlp_run}", "trust_checkpoint=true"]))
    assert marker.exists()


def test_an_older_checkpoint_holding_other_types_is_refused_until_trusted(mlp_run, names_file):
    """genlab once kept OmegaConf containers in the hyper-parameters: such a file says what to do."""
    path = mlp_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["optimizer"] = OmegaConf.create(checkpoint["hyper_parameters"]["optimizer"])
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"holds .*omegaconf\.dictconfig\.DictConfig.*trust_checkpoint=true"):
        sample(command_config("sample", [f"ckpt_path={path}"]))
    assert len(sample(command_config("sample", [f"ckpt_path={path}", "num_samples=3", "trust_checkpoint=true"]))) == 3
    resume = [f"data.path={names_file}", "trainer.max_steps=20", "val_every=10", *TINY, f"ckpt_path={mlp_run}"]
    with pytest.raises(CheckpointError, match="trust_checkpoint=true"):
        train(compose_config(resume, mlp_run))
    assert run_training(mlp_run, [*resume, "trust_checkpoint=true"])["steps"] == 20


def test_checkpoints_under_mixed_precision_load_safely(text_file, tmp_path):
    """Lightning adds the precision's state to the checkpoint: a loss scaler's under 16-mixed (here
    on the CPU, as a plugin: Lightning's precision=16-mixed takes bf16 on a CPU)."""
    scaler = "+trainer.plugins=[{_target_: lightning.pytorch.plugins.MixedPrecision, precision: 16-mixed, device: cpu}]"
    for name, precision in {"bf16": ["trainer.precision=bf16-mixed"], "16": ["trainer.precision=null", scaler]}.items():
        run_dir = tmp_path / name
        run_training(run_dir, [f"data.path={text_file}", "data=divina", "model=gpt", "model.n_layer=1",
                               "model.n_embd=16", "model.n_head=2", "data.seq_len=16", "data.batch_size=4",
                               "trainer.max_steps=2", "val_every=2", "num_samples=0", "logger=none", *precision])
        path = run_dir / "checkpoints" / "last.ckpt"
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        checkpoint = read_checkpoint(path)
        assert checkpoint["global_step"] == 2 and ("MixedPrecision" in checkpoint) == (name == "16")


# --- a full disk ----------------------------------------------------------------------------------
class FillDisk(L.Callback):
    """Fault injection: at the validation after update ``at``, fill the disk that holds the run's
    folder until half of a checkpoint's size is left, and make the checkpoints that follow a
    checkpoint's size bigger (as a growing history makes them), so that they would not fit even
    written over the old ones."""

    def __init__(self, at: int):
        self.at, self.grow = at, 0

    def on_validation_start(self, trainer, pl_module):
        if trainer.global_step == self.at:
            folder = Path(trainer.default_root_dir)
            self.grow = (folder / "checkpoints" / "last.ckpt").stat().st_size
            (folder.parent / "filler").write_bytes(bytes(shutil.disk_usage(folder).free - self.grow // 2))

    def state_dict(self):  # a callback's state: where a checkpoint keeps what a run adds to it
        return {"grown": torch.zeros(self.grow, dtype=torch.uint8)}


# the resume runs without the fault injector, whose state the checkpoint holds: Lightning says so
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_a_disk_that_fills_mid_save_keeps_the_previous_checkpoint_and_the_run_resumes(small_disk, names_file):
    run_dir = small_disk / "run"
    common = [f"data.path={names_file}", "val_every=10", *TINY]
    fill = ["+callbacks.fill._target_=test_checkpoint_safety.FillDisk", "+callbacks.fill.at=20"]
    with pytest.raises(DiskFull) as failed:
        train(compose_config([*common, "trainer.max_steps=30", *fill], run_dir))
    message = str(failed.value)
    assert f"the disk holding {run_dir / 'checkpoints'} is full" in message
    needed, free = (int(n.replace(",", "")) for n in re.findall(r"\(([\d,]+) bytes\)", message))
    saved = (run_dir / "checkpoints" / "last.ckpt").stat().st_size
    assert abs(needed - 2 * saved) < saved / 100 and free < saved  # the new checkpoint is twice the old one
    assert "the previous best.ckpt is whole" in message  # best.ckpt is written first
    assert message.endswith(f"resume with:\n  python train.py ckpt_path={run_dir}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no temp file
    assert read_checkpoint(run_dir)["global_step"] == 10
    assert not (run_dir / "metrics.json").exists()

    (small_disk / "filler").unlink()
    metrics = run_training(run_dir, [*common, "trainer.max_steps=30", f"ckpt_path={run_dir}"])
    assert metrics["status"] == "completed" and metrics["steps"] == 30


def fill(disk: Path) -> None:
    """Write a file until the disk holds not one more byte."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError:
                pass


def test_a_picture_written_to_a_full_disk_leaves_the_previous_one_whole(small_disk):
    path = small_disk / "insight" / "loss_curves.png"
    plot_curves({"train": ([0, 1], [2.0, 1.0])}, path)
    before = path.read_bytes()
    fill(small_disk)
    with pytest.raises(DiskFull) as failed:
        plot_curves({"train": ([0, 1, 2], [2.0, 1.0, 0.5])}, path)
    assert f"the disk holding {path.parent} is full" in str(failed.value)
    assert "needs" in str(failed.value) and "the previous loss_curves.png is whole" in str(failed.value)
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["loss_curves.png"]
