"""Bad input costs seconds, not a run: one clear message, and no misleading output left behind."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import compose_config, run_training
from genlab.data.fetch import fetch
from genlab.data.names import ITALIAN_NAMES, NamesDataModule
from genlab.errors import ConfigError, DataError, TrainingDiverged
from genlab.cli.sample import sample
from genlab.cli.train import CONF_DIR, train
from genlab.data.module import ready


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
    assert path == cached and len(ready(NamesDataModule(data_dir=tmp_path, mirror=mirror)).names) == 9101
    assert (cached.parent / (cached.name + ".corrupt")).read_text() == "truncated download"


def test_a_damaged_mirror_is_named(tmp_path):
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
                          "scheduler.gamma=1e37", "loop.updates_per_step=10", "val_every=20",
                          "trainer.max_steps=200", "num_samples=0", "logger=none"], run_dir)
    with pytest.raises(TrainingDiverged, match="became (nan|inf) at step 30"):
        train(cfg)
    good = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 20
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    assert not (run_dir / "metrics.json").exists()


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt")
    text = tmp / "text.txt"
    text.write_text("nel mezzo del cammin di nostra vita " * 60)
    run_training(tmp / "run", ["model=gpt", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "data=divina",
                               f"data.path={text}", "data.seq_len=16", "data.batch_size=4",
                               "trainer.max_steps=4", "val_every=4", "logger=none"])
    return tmp / "run"


@pytest.mark.parametrize("overrides, pattern", [
    (["num_samples=0"], "num_samples must be a whole number from 1 to"),
    (["num_samples=abc"], "num_samples must be a whole number from 1 to .* got 'abc'"),
    (["temperature=0"], "temperature must be a finite number > 0"),
    (["temperature=-1"], "temperature must be a finite number > 0"),
    (["temperature=nan"], "temperature must be a finite number > 0"),
    (["top_k=2.5"], "top_k must be a whole number of tokens"),
    (["max_new_tokens=-1"], "max_new_tokens must be a whole number from 0 to 100,000, got -1"),
    (["max_new_tokens=1000000000"], "max_new_tokens must be a whole number from 0 to 100,000"),
    (["prompt='nel mezzo del cammin di nostra vita'"], "the prompt has 35 tokens, more than the model's context of 16"),
    (["prompt=xu"], r"outside the model's vocabulary: \['u', 'x'\]"),
])
def test_bad_sampling_arguments(gpt_run, overrides, pattern):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={gpt_run}", *overrides])
    with pytest.raises(ConfigError, match=pattern):
        sample(cfg)


def test_sample_without_a_checkpoint_prints_its_usage(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "sample.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "ckpt_path is missing" in done.stderr and "usage: python sample.py ckpt_path=" in done.stderr


def test_sample_out_naming_a_folder_is_refused_and_leaves_nothing_there(gpt_run, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={gpt_run}", f"out={folder}"])
    with pytest.raises(ConfigError, match=f"out={folder} is a folder; give a file name"):
        sample(cfg)
    assert list(folder.iterdir()) == []


def test_ctrl_c_while_sampling_text_keeps_what_was_made(gpt_run, monkeypatch, capsys):
    from genlab.models.base import LanguageModel

    calls = {"n": 0}
    real = LanguageModel.next_token_logits

    def interrupted_after_five(self, idx, state=None):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(self, idx, state)

    monkeypatch.setattr(LanguageModel, "next_token_logits", interrupted_after_five)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={gpt_run}", "prompt=nel", "num_samples=2", "max_new_tokens=100"])
    samples = sample(cfg)
    assert [len(s) for s in samples] == [3 + 5, 3 + 5]  # the prompt and the five tokens made before Ctrl-C
    assert "interrupted: the 5 tokens generated so far" in capsys.readouterr().err


def test_an_image_folder_skips_corrupt_files_and_refuses_an_empty_one(tmp_path, caplog):
    from PIL import Image

    from genlab.data.images import ImageFolderDataModule

    folder = tmp_path / "faces" / "img"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (89, 109), (40 * i, 100, 200)).save(folder / f"{i:06d}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    dm = ready(ImageFolderDataModule(root=str(tmp_path / "faces"), batch_size=2, num_workers=0))
    assert len(dm.paths) == 3 and dm.skipped == 1
    assert "skipped 1 file(s) that could not be decoded" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 3, 64, 64) and batch.min() >= -1 and batch.max() <= 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no readable image .* in {empty}"):
        ready(ImageFolderDataModule(root=str(empty)))


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


# --- values that cannot work: one message, before anything is loaded or written -----------------
@pytest.mark.parametrize("overrides, pattern", [
    (["trainer.max_steps=0"], "trainer.max_steps must be a whole number of at least 1 \\(or -1\\), got 0"),
    (["trainer.max_steps=abc"], "trainer.max_steps must be a whole number .* got 'abc'"),
    (["val_every=0"], "val_every must be a whole number of at least 1, got 0"),
    (["data.batch_size=0"], "data.batch_size must be a whole number of at least 1, got 0"),
    (["optimizer.lr=-0.1"], "optimizer.lr must be a positive finite number"),
    (["optimizer.lr=nan"], "optimizer.lr must be a positive finite number"),
    (["num_samples=-2"], "num_samples must be a whole number"),
    (["loop.updates_per_step=7", "val_every=20"], "val_every=20 must be a multiple of loop.updates_per_step=7"),
])
def test_values_that_cannot_work(overrides, pattern, names_file, tmp_path):
    expect_error(tmp_path, [f"data.path={names_file}", *overrides], ConfigError, pattern)
    assert not (tmp_path / "run").exists()  # a refused command leaves no folder behind


def test_a_seq_len_of_zero(text_file, tmp_path):
    expect_error(tmp_path, ["data=divina", f"data.path={text_file}", "data.seq_len=0"], ConfigError,
                 "data.seq_len must be a whole number of at least 1, got 0")


def test_a_word_list_too_small_to_split(tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("anna\nluca\nmarco\ngiulia\nsara\n")
    expect_error(tmp_path, [f"data.path={few}", "data.batch_size=2"], DataError,
                 "gives 5 names, which the split leaves as 4 for training, 0 for validation and 1 for test")


def test_one_very_long_line_is_dropped_and_counted(names_file, caplog):
    text = names_file.read_text() + "a" * 20_000 + "\n"
    names_file.write_text(text)
    dm = ready(NamesDataModule(path=str(names_file)))
    assert dm.report.too_long == 1 and dm.max_len < 50 and len(dm.names) == 300
    assert "dropped 1 entries longer than data.max_name_length=50 characters" in caplog.text


def test_a_byte_order_mark_and_a_line_of_dashes_lose_no_name(tmp_path):
    own = tmp_path / "own.txt"
    own.write_bytes("\ufeffanna\nmarco\n----------\nluca\n".encode("utf-8"))
    assert ready(NamesDataModule(path=str(own), batch_size=1, split=(0.34, 0.67))).names == ["anna", "marco", "luca"]


def test_a_names_model_given_a_prompt_samples_whole_names_that_start_with_it(names_file, tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", "loop.updates_per_step=10", "trainer.max_steps=50",
                           "val_every=50", "num_samples=0", "logger=none"])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={run_dir}", "prompt=ma", "num_samples=20"])
    names = sample(cfg)
    assert len(names) == 20 and all(n.startswith("ma") and "." not in n and len(n) < 40 for n in names)


def test_gpt2_bpe_offline_without_a_mirror_says_what_to_do(tmp_path, monkeypatch):
    import socket

    from genlab.data.tokenizer import tokenizer_from_config

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("GENLAB_DATA_MIRROR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(DataError, match="cannot load GPT-2's BPE files.*paths.data_mirror.*gpt2/vocab.bpe"):
        tokenizer_from_config({"type": "gpt2"})  # what sample.py does with a BPE checkpoint
    text = tmp_path / "text.txt"
    text.write_text("nel mezzo del cammin di nostra vita " * 10)
    expect_error(tmp_path, ["data=divina", f"data.path={text}", "data.tokenizer=gpt2", "data.seq_len=8"],
                 DataError, "cannot load GPT-2's BPE files")


def test_folders_that_cannot_be_written_are_named(names_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=f"cannot write into {blocker / 'data'}/names .*paths.data_dir"):
        ready(NamesDataModule(data_dir=str(blocker / "data")))  # refused before any data is read
    with pytest.raises(ConfigError, match=f"cannot write into {blocker / 'run'} .*hydra.run.dir"):
        train(compose_config([f"data.path={names_file}"], blocker / "run"))


def test_cached_data_is_readable_by_others(tmp_path, mirror):
    import os

    previous = os.umask(0o022)
    try:
        path = fetch(ITALIAN_NAMES, tmp_path, mirror)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_run_diverging_before_its_first_checkpoint_says_there_is_none(names_file, tmp_path):
    cfg = compose_config([f"data.path={names_file}", "optimizer=sgd", "optimizer.lr=1e37", "loop.updates_per_step=10",
                          "val_every=100", "trainer.max_steps=200", "num_samples=0", "logger=none"], tmp_path / "run")
    with pytest.raises(TrainingDiverged, match="No checkpoint was saved before that"):
        train(cfg)


def test_compare_skips_a_corrupt_metrics_file_and_says_so(names_file, tmp_path, capsys):
    from genlab.results.compare import compare

    outputs = tmp_path / "outputs"
    run_training(outputs / "good", [f"data.path={names_file}", "loop.updates_per_step=10", "trainer.max_steps=20",
                                    "val_every=20", "num_samples=0", "logger=none"])
    (outputs / "broken").mkdir()
    (outputs / "broken" / "metrics.json").write_text('{"val_loss": 1.2')  # cut short
    rows = compare(outputs)
    assert [r["run"] for r in rows] == ["good"]
    assert f"skipped {outputs / 'broken'}: its metrics.json" in capsys.readouterr().err


# --- images ---------------------------------------------------------------------------------------
def test_a_truncated_jpeg_is_skipped_while_training_and_counted(tmp_path, caplog):
    from PIL import Image

    from genlab.data.images import ImageFolderDataModule

    folder = tmp_path / "faces"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=95)
    cut = folder / "3.jpg"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a download cut off halfway
    dm = ready(ImageFolderDataModule(root=str(folder), image_size=16, batch_size=2, num_workers=0))
    assert cut in dm.paths  # the header check cannot see it: it is found while decoding
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(b.shape == (2, 3, 16, 16) for b in batches)
    assert f"skipped {cut}: it cannot be decoded" in caplog.text and "1 unreadable image(s) skipped" in caplog.text


def test_fewer_images_than_one_batch_is_refused(tmp_path):
    from PIL import Image

    from genlab.data.images import ImageFolderDataModule

    for i in range(3):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / f"{i}.png")
    message = r"has 3 readable images, 3 of them for training \(data.val_fraction=0.05 held out\), fewer than one batch"
    with pytest.raises(DataError, match=message + " of data.batch_size=8"):
        ready(ImageFolderDataModule(root=str(tmp_path), batch_size=8, num_workers=0))


@pytest.mark.parametrize("args, pattern", [
    (["model=gpt", "model.n_embed=64"], r"model.n_embed is not a setting; did you mean model.n_embd\b"),
    (["sed=3"], r"sed is not a setting; did you mean seed\b"),
    (["-m", "model.n_embd=5,10", "optimizer.lrr=1e-3,3e-4"], r"optimizer.lrr is not a setting; did you mean optimizer.lr\b"),
    (["data=divina", "data.seq_length=64", "trainer.max_step=3"],
     r"did you mean data.seq_len\b.*; trainer.max_step is not a setting; did you mean trainer.max_steps"),
])
def test_a_key_that_does_not_exist_gets_the_closest_keys_of_its_group(args, pattern):
    from genlab.cli.overrides import check_command_line

    with pytest.raises(ConfigError, match=pattern):
        check_command_line("train", args)
    check_command_line("train", ["model=gpt", "model.n_embd=64", "+model.extra=1"])  # real keys pass


def test_a_mistyped_key_stops_train_before_anything_loads_or_is_written(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, str(REPO / "train.py"), "model=gpt", "model.n_embed=64",
                           f"paths.data_dir={tmp_path / 'data'}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "+model.n_embed" not in done.stderr
    assert "did you mean model.n_embd" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no data, no run folder


def test_a_seed_that_is_not_a_number(names_file, tmp_path):
    expect_error(tmp_path, [f"data.path={names_file}", "seed=abc"], ConfigError, "seed must be a whole number.*'abc'")


def test_a_sweep_storage_that_cannot_be_written_or_reached(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from genlab.cli.overrides import check_command_line

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "hparams_search=names_mlp_optuna",
                           f"hydra.sweeper.storage=sqlite:///{blocker}/x.db"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "sqlalchemy" not in done.stderr.lower()
    assert f"the folder {blocker} does not exist" in done.stderr and len(done.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    with pytest.raises(ConfigError, match="cannot reach it .*use a file: sqlite:///"):
        check_command_line("train", ["hparams_search=names_mlp_optuna",
                                     "hydra.sweeper.storage=postgresql://nobody@127.0.0.1:1/study"])
    check_command_line("train", ["hparams_search=names_mlp_optuna", f"hydra.sweeper.storage=sqlite:///{tmp_path}/x.db"])


def test_an_option_for_text_models_is_refused_for_an_image_checkpoint(tmp_path):
    from test_dcgan import faces as make_faces, gan_overrides

    run = tmp_path / "run"
    run_training(run, gan_overrides(make_faces.__wrapped__(tmp_path), "trainer.max_steps=1", "logger=none"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={run}", "prompt=ciao"])
    with pytest.raises(ConfigError, match="prompt: only for text models, and .* is an image model's checkpoint; drop prompt="):
        sample(cfg)
    assert not (run / "samples.png").exists()
