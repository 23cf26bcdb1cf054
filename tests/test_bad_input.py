"""Bad input costs seconds, not a run: one clear message, and no misleading output left behind."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import compose_config, run_training
from genlab.data.fetch import fetch
from genlab.data.names import ITALIAN_NAMES, NamesDataModule
from genlab.errors import ConfigError, DataError, TrainingDiverged
from genlab.sample import sample
from genlab.train import CONF_DIR, train


def expect_error(tmp_path, overrides, error, pattern):
    run_dir = tmp_path / "run"
    cfg = compose_config(overrides, run_dir)
    with pytest.raises(error, match=pattern):
        train(cfg)
    assert not (run_dir / "metrics.json").exists()


def test_empty_names_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    expect_error(tmp_path, [f"data.path={empty}"], DataError, "holds no usable names")


def test_text_that_is_not_utf8(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("perché così è la città ".encode("latin-1") * 50)
    expect_error(tmp_path, ["data=divina", f"data.path={latin}"], DataError, "is not UTF-8 text.*iconv")


def test_a_corrupt_cached_file_is_set_aside_and_fetched_again(tmp_path, mirror):
    cached = tmp_path / ITALIAN_NAMES.name
    cached.parent.mkdir(parents=True)
    cached.write_text("truncated download")
    path = fetch(ITALIAN_NAMES, tmp_path, mirror)
    assert path == cached and len(NamesDataModule(data_dir=tmp_path, mirror=mirror).names) == 9101
    assert (cached.parent / (cached.name + ".corrupt")).read_text() == "truncated download"


def test_a_damaged_mirror_is_named(tmp_path, mirror):
    bad_mirror = tmp_path / "mirror"
    (bad_mirror / "names").mkdir(parents=True)
    (bad_mirror / ITALIAN_NAMES.name).write_text("not the names")
    with pytest.raises(DataError, match="does not match its checksum.*damaged"):
        fetch(ITALIAN_NAMES, tmp_path / "cache", bad_mirror)


@pytest.mark.parametrize("overrides, pattern", [
    (["model=gpt", "model.n_embd=30", "model.n_head=4"], "n_embd=30 is not divisible by model.n_head=4"),
    (["model=wavenet", "model.block_size=6"], "block_size=6: the WaveNet's context must be a power of two"),
    (["model=gpt", "model.block_size=8"], "longer than the model's context model.block_size=8"),
    (["data=divina", "data.tokenizer=morse"], "data.tokenizer=morse is not known"),
])
def test_configs_that_cannot_work(overrides, pattern, names_file, text_file, tmp_path):
    data = [f"data.path={text_file if 'data=divina' in overrides else names_file}"]
    expect_error(tmp_path, overrides + data, ConfigError, pattern)


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(names_file, tmp_path):
    run_dir = tmp_path / "run"
    # the learning rate jumps to 1e36 after update 20: the weights overflow, just after a validation and checkpoint
    cfg = compose_config([f"data.path={names_file}", "optimizer=sgd", "scheduler=step", "scheduler.milestones=[20]",
                          "scheduler.gamma=1e37", "model.updates_per_step=10", "val_every=20",
                          "trainer.max_steps=200", "num_samples=0", "logger=none"], run_dir)
    with pytest.raises(TrainingDiverged, match="became (nan|inf) at step 30"):
        train(cfg)
    good = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert good["global_step"] == 20
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    assert not (run_dir / "metrics.json").exists()


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt")
    text = tmp / "text.txt"
    text.write_text("nel mezzo del cammin di nostra vita " * 60)
    run_training(tmp / "run", ["model=gpt", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "data=divina",
                               f"data.path={text}", "data.block_size=16", "data.batch_size=4",
                               "trainer.max_steps=4", "val_every=4", "logger=none"])
    return tmp / "run"


@pytest.mark.parametrize("overrides, pattern", [
    (["num_samples=0"], "num_samples must be at least 1"),
    (["temperature=0"], "temperature must be > 0"),
    (["temperature=-1"], "temperature must be > 0"),
    (["prompt='nel mezzo del cammin di nostra vita'"], "the prompt has 35 tokens, more than the model's context of 16"),
    (["prompt=xu"], r"outside the model's vocabulary: \['u', 'x'\]"),
])
def test_bad_sampling_arguments(gpt_run, overrides, pattern):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={gpt_run}", *overrides])
    with pytest.raises(ConfigError, match=pattern):
        sample(cfg)


def test_an_image_folder_skips_corrupt_files_and_refuses_an_empty_one(tmp_path, caplog):
    from PIL import Image

    from genlab.data.images import ImageFolderDataModule

    folder = tmp_path / "faces" / "img"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (89, 109), (40 * i, 100, 200)).save(folder / f"{i:06d}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    dm = ImageFolderDataModule(root=str(tmp_path / "faces"), batch_size=2, num_workers=0)
    assert len(dm.paths) == 3 and dm.skipped == 1
    assert "skipped 1 file(s) that could not be decoded" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 3, 64, 64) and batch.min() >= -1 and batch.max() <= 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no readable image .* in {empty}"):
        ImageFolderDataModule(root=str(empty))


def test_a_language_model_on_image_data_names_both_options(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    bad = subprocess.run([sys.executable, "train.py", "model=gpt", "data=celeba", f"hydra.run.dir={tmp_path}/run"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "error: model=gpt works on text data, but data=celeba gives image data" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
