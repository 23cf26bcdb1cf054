"""The DCGAN: network shapes, one step training both networks, step counting, what a run writes,
resume, sampling from a checkpoint, configs that cannot work, and its quality figures (FID, KID)
with a small feature extractor standing in for InceptionV3, whose weights these machines lack."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config, image_file, run_training, snapshot
from PIL import Image
from torch import nn

from genlab.results import quality
from genlab.run.checkpoints import load_model, read_checkpoint
from genlab.data.images import ImageFolderDataModule
from genlab.errors import ConfigError, TrainingDiverged
from genlab.models.dcgan import DCGAN, Discriminator, Generator
from genlab.cli.train import train
from genlab.data.module import ready


@pytest.fixture
def faces(tmp_path):
    """24 small made-up RGB images and one file that is not an image."""
    folder = tmp_path / "faces"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(24):
        pixels = torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def gan_overrides(faces, *extra):
    """A tiny DCGAN run; without FID unless ``metrics.images`` is given (the tests that measure it
    stand in a small extractor for InceptionV3)."""
    if not any(e.startswith("metrics.images=") for e in extra):
        extra = ("metrics.images=0", *extra)
    return ["model=dcgan", "data=celeba", f"data.root={faces}", "data.image_size=16", "data.batch_size=8",
            "data.num_workers=0", "model.ngf=8", "model.ndf=8", "model.nz=12", "model.grid_every=2",
            "model.grid_size=4", "val_every=2", "trainer.max_steps=4", "data.val_fraction=0.25", *extra]


@pytest.mark.parametrize("size", [16, 32, 64])
def test_network_shapes(size):
    generator, discriminator = Generator(size, nz=100, ngf=8), Discriminator(size, ndf=8)
    images = generator(torch.randn(5, 100, 1, 1))
    assert images.shape == (5, 3, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh
    assert discriminator(images).shape == (5,)


def test_the_notebook_sizes():
    model = DCGAN(image_size=64)
    assert model.generator(torch.randn(2, 100, 1, 1)).shape == (2, 3, 64, 64)
    assert [m.out_channels for m in model.generator if isinstance(m, torch.nn.ConvTranspose2d)] == [512, 256, 128, 64, 3]
    assert [m.out_channels for m in model.discriminator if isinstance(m, torch.nn.Conv2d)] == [64, 128, 256, 512, 1]
    convs = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(convs.std().item() - 0.02) < 0.002  # N(0, 0.02) initialisation


def test_image_sizes_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match="data.image_size=48"):
        DCGAN(image_size=48)


def test_a_run_trains_both_networks_counts_batches_and_writes_its_pictures(faces, tmp_path):
    run = tmp_path / "run"
    cfg = compose_config(gan_overrides(faces), run)
    from genlab.cli.train import build_model, instantiate

    before = build_model(cfg, ready(instantiate(cfg.data))).state_dict()
    metrics = run_training(run, gan_overrides(faces, "trainer.log_every_n_steps=1"))  # a curve point every step

    assert metrics["steps"] == 4 and metrics["images_per_second"] > 0
    checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4  # one step = one batch, not one per optimizer
    d_state, g_state = checkpoint["optimizer_states"]
    assert {s["step"].item() for s in d_state["state"].values()} == {4}
    assert {s["step"].item() for s in g_state["state"].values()} == {4}
    after = checkpoint["state_dict"]
    for net in ("generator", "discriminator"):
        changed = [k for k in after if k.startswith(net) and "weight" in k and not torch.equal(after[k], before[k])]
        assert changed, f"the {net} did not change"
    assert torch.equal(after["fixed_noise"], before["fixed_noise"])

    assert sorted(p.name for p in (run / "grids").iterdir()) == [
        "step_0000001.png", "step_0000002.png", "step_0000004.png"]
    assert image_file(run / "grids" / "step_0000004.png").size == (2 + 4 * 18, 2 + 1 * 18)  # 4 images in a row
    assert image_file(run / "progress.gif").frames == 3
    assert image_file(run / "losses.png").format == "PNG"
    assert image_file(run / "real_images.png").size == (2 + 8 * 18, 2 + 1 * 18)  # the first real batch of 8

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"samples/real_images", "samples/fixed_noise"} <= set(events.Tags()["images"])
    assert {"loss/discriminator", "loss/generator", "probability/real", "probability/fake_before", "probability/fake_after"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("samples/fixed_noise")] == [1, 2, 4]


def test_resume_continues_the_step_count_and_the_loss_history(faces, tmp_path):
    run = tmp_path / "run"
    run_training(run, gan_overrides(faces, "trainer.max_steps=2"))
    metrics = run_training(run, gan_overrides(faces, "trainer.max_steps=4", f"ckpt_path={run}"))
    assert metrics["steps"] == 4
    history = read_checkpoint(run / "checkpoints" / "last.ckpt")["genlab"]["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and set(history[0]) == {"step", "loss_d", "loss_g"}
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]  # no last-v1.ckpt beside it


def test_a_changed_image_folder_is_a_changed_plan(faces, tmp_path):
    """The image data gave the run's plan no fingerprint: the same command over an edited folder of
    images was the same plan, so a sweep kept or resumed runs of other images."""
    def fingerprint():
        return ready(ImageFolderDataModule(root=str(faces), image_size=16, batch_size=8, num_workers=0,
                                     val_fraction=0.25)).fingerprint

    first = fingerprint()
    assert first and fingerprint() == first  # the same files: the same plan
    run_dir = tmp_path / "run"
    run_training(run_dir, gan_overrides(faces))
    before = snapshot(run_dir)
    edited = faces / "003.png"
    times = edited.stat()
    Image.new("RGB", (20, 20), "white").save(edited)  # another image under the same name
    os.utime(edited, ns=(times.st_atime_ns, times.st_mtime_ns + 2 * 10**9))  # written later (whole seconds)
    edited_print = fingerprint()
    assert edited_print != first
    with pytest.raises(Exception, match="data \\(content fingerprint\\)"):
        train(compose_config(gan_overrides(faces), run_dir))
    assert snapshot(run_dir) == before
    Image.new("RGB", (20, 20), "black").save(faces / "024.png")  # one image more
    assert fingerprint() not in (first, edited_print)


def test_a_diverging_gan_stops_naming_the_step_and_no_checkpoint_holds_it(faces, tmp_path, monkeypatch):
    # the losses are read off the device only every READ_LOSSES_EVERY steps; the generator's loss is
    # NaN at step 7, between the checkpoints of steps 6 and 8, long before the next reading
    assert DCGAN.READ_LOSSES_EVERY > 8
    record = DCGAN.record

    def poisoned(self, batch_size, **losses):
        if self.global_step == 7:
            losses["loss_g"] = losses["loss_g"] * float("nan")
        record(self, batch_size, **losses)

    monkeypatch.setattr(DCGAN, "record", poisoned)
    run = tmp_path / "run"
    cfg = compose_config(gan_overrides(faces, "trainer.max_steps=20", "logger=none"), run)
    with pytest.raises(TrainingDiverged, match="loss_g nan at step 7;"):
        train(cfg)
    good = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert good["global_step"] == 6
    assert [h["step"] for h in good["genlab"]["history"]] == [1, 2, 3, 4, 5, 6]
    assert not (run / "metrics.json").exists()


def test_a_truncated_image_never_ends_a_run_with_loader_workers(faces, tmp_path):
    cut = faces / "cut.jpg"  # a JPEG cut off halfway: its header passes the folder check, decoding fails
    with Image.open(faces / "005.png") as image:
        image.save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    metrics = run_training(tmp_path / "run", gan_overrides(faces, "data.num_workers=1"))
    assert metrics["status"] == "completed" and metrics["steps"] == 4


def test_sampling_a_grid_and_an_interpolation_from_a_checkpoint(faces, tmp_path):
    run = tmp_path / "run"
    run_training(run, gan_overrides(faces, "trainer.max_steps=1"))
    model, _ = load_model(run / "checkpoints" / "last.ckpt")
    model.train()
    first = model.generate(model.noise(3, torch.Generator().manual_seed(0)))
    assert model.training and model.generate(model.noise(3, torch.Generator().manual_seed(0))).equal(first)

    for args, name, size in (([], "samples.png", (2 + 8 * 18, 2 + 2 * 18)),
                             (["interpolate=true"], "interpolation.png", (2 + 16 * 18, 2 + 18))):
        done = subprocess.run([sys.executable, "sample.py", f"ckpt_path={run}", "num_samples=16", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert image_file(run / name).size == size


@pytest.mark.parametrize("overrides, message", [
    (["model=dcgan", "data=names"], "model=dcgan works on image data, but data=names gives text data"),
    (["optimizer=sgd"], "model=dcgan sets its optimizers in model.optimizer"),
])
def test_configs_that_cannot_work_name_their_options(overrides, message, faces, tmp_path):
    if "data=names" not in overrides:
        overrides = gan_overrides(faces, *overrides)
    bad = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path}/run"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stderr
    assert message in bad.stderr and "Traceback" not in bad.stderr


def test_a_gan_config_without_hydra_runs_through_train(faces, tmp_path):
    """``train`` returns no figure for a run without one (no FID here; sweeps skip it)."""
    cfg = compose_config(gan_overrides(faces, "trainer.max_steps=1"), tmp_path / "run")
    assert train(cfg) is None


def test_epochs_count_whole_passes_over_the_images(faces, tmp_path):
    """notebook_dcgan trains by epochs (max_steps=-1): the 18 training images of 24 (a quarter held
    out) in batches of 8 are 2 steps an epoch."""
    run = tmp_path / "run"
    metrics = run_training(run, gan_overrides(faces, "trainer.max_steps=-1", "trainer.max_epochs=2"))
    assert metrics["steps"] == 4
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_a_run_shorter_than_its_checkpoint_interval_leaves_one_last_checkpoint(faces, tmp_path):
    run_training(tmp_path / "run", gan_overrides(faces, "val_every=5", "trainer.max_steps=3"))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last.ckpt"]  # no last-v1.ckpt


def test_auto_workers_take_the_spare_cores_of_this_process_share_up_to_eight(monkeypatch):
    from genlab.data import images

    monkeypatch.setattr(images.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert images.worker_count("auto") == 8  # 15 spare cores, at most 8
    assert images.worker_count("auto", processes=4) == 3  # DDP: 4 cores each, one of them trains
    monkeypatch.setattr(images.os, "sched_getaffinity", lambda pid: {0, 1})
    assert images.worker_count("auto") == 1
    assert images.worker_count(0) == 0


def test_a_bad_worker_count_is_refused_before_the_images_are_read(tmp_path):
    from genlab.data.images import ImageFolderDataModule

    with pytest.raises(ConfigError, match="data.num_workers='many': give a number .* or auto"):
        ready(ImageFolderDataModule(root=str(tmp_path / "nowhere"), num_workers="many"))


# --- quality: FID and KID ------------------------------------------------------------------------
class TinyFeatures(nn.Module):
    """A small fixed feature extractor standing in for InceptionV3: uint8 images -> 16 features
    (the mean and spread of 8 random filters' responses)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        with torch.no_grad():
            weights = torch.randn(self.conv.weight.numel() + 8, generator=torch.Generator().manual_seed(0))
            self.conv.weight.copy_(weights[:-8].view_as(self.conv.weight))
            self.conv.bias.copy_(weights[-8:])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        responses = torch.relu(self.conv(images.float() / 127.5 - 1))
        return torch.cat([responses.mean((2, 3)), responses.std((2, 3))], 1)


@pytest.fixture
def extractor(monkeypatch):
    """Runs measure FID and KID on TinyFeatures."""
    monkeypatch.setattr(quality, "inception_extractor", lambda weights: TinyFeatures())


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """As offline: an empty torch hub cache, and every download fails."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


def test_fid_is_zero_for_the_real_split_against_itself_and_large_against_noise(tmp_path):
    # 40 smooth pictures (a few colours blended over the frame) stand in for faces: the tests make
    # their own images, as CelebA's licence forbids shipping its images
    faces = tmp_path / "faces"
    faces.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(40):
        corners = torch.rand(1, 3, 3, 3, generator=generator)
        picture = torch.nn.functional.interpolate(corners, size=(48, 40), mode="bilinear", align_corners=True)[0]
        Image.fromarray((picture.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(faces / f"{i}.png")
    data = ready(ImageFolderDataModule(root=str(faces), data_dir=str(tmp_path / "data"), image_size=32, batch_size=8,
                                 num_workers=0, val_fraction=0.25))
    measure = quality.ImageQuality(TinyFeatures(), data, images=100)
    assert measure.real_count == 10  # all there are: a quarter of 40
    real = measure.real_features(torch.device("cpu"))
    other_faces = measure.features(torch.stack([data.transform(Image.open(p).convert("RGB")) for p in data.paths[:10]]))
    noise = measure.features(torch.rand(10, 3, 32, 32) * 2 - 1)

    itself, faces_score, noise_score = measure.score(real), measure.score(other_faces), measure.score(noise)
    assert abs(itself["fid"]) < 1e-6
    assert noise_score["fid"] > 5 * faces_score["fid"] > 0
    # KID's subsets are as large as the 10 images allow (torchmetrics' default, 1000, would refuse)
    assert noise_score["kid_mean"] > 5 * abs(faces_score["kid_mean"])
    assert measure.score(noise) == noise_score  # the same subsets every time


def test_a_run_writes_fid_and_kid_curves_and_keeps_the_best_fid(faces, tmp_path, extractor):
    run = tmp_path / "run"
    cfg = compose_config(gan_overrides(faces, "metrics.images=5"), run)
    returned = train(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert returned == metrics["fid"] > 0  # what a study minimises
    assert metrics["fid_images"] == 5 and metrics["fid_real_images"] == 5  # 6 held out, 5 asked for
    assert metrics["kid_std"] >= 0 and metrics["best_fid"] <= metrics["fid"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    fid = {e.step: e.value for e in events.Scalars("quality/fid")}
    assert sorted(fid) == [2, 4] and fid[4] == pytest.approx(metrics["fid"])
    assert [e.step for e in events.Scalars("quality/kid")] == [2, 4]
    best = read_checkpoint(run / "checkpoints" / "best.ckpt")
    assert best["global_step"] == min(fid, key=fid.get)  # the best FID's model
    assert best["genlab"]["best_fid"] == pytest.approx(min(fid.values()))

    # the figure depends on the model alone: the same fixed noise, the same held-out images
    from genlab.cli.train import instantiate

    model, _ = load_model(run / "checkpoints" / "best.ckpt")
    measure = quality.ImageQuality(TinyFeatures(), ready(instantiate(cfg.data)), images=5, seed=cfg.seed)
    generated = model.generate(torch.cat(list(measure.noise_batches(model.latent_shape))))
    assert measure.score(measure.features(generated))["fid"] == pytest.approx(min(fid.values()), rel=1e-5)


def test_the_real_features_are_cached_by_content_size_and_extractor(faces, tmp_path, extractor, caplog):
    cache = tmp_path / "data" / "quality"
    run_training(tmp_path / "a", gan_overrides(faces, "trainer.max_steps=2", "logger=none", "metrics.images=6"))
    assert len(list(cache.iterdir())) == 1
    with caplog.at_level(logging.INFO, logger="genlab"):
        run_training(tmp_path / "b", gan_overrides(faces, "trainer.max_steps=2", "logger=none", "metrics.images=6"))
    assert "the real images' features from" in caplog.text and len(list(cache.iterdir())) == 1
    run_training(tmp_path / "c", gan_overrides(faces, "trainer.max_steps=2", "logger=none", "metrics.images=6", "data.image_size=8"))
    assert len(list(cache.iterdir())) == 2  # another size: other features
    held_out = ready(ImageFolderDataModule(root=str(faces), image_size=16, batch_size=8, num_workers=0,
                                     val_fraction=0.25)).val_paths[0]
    Image.new("RGB", (20, 20), "white").save(held_out)  # the same name, other pixels
    run_training(tmp_path / "d", gan_overrides(faces, "trainer.max_steps=2", "logger=none", "metrics.images=6"))
    assert len(list(cache.iterdir())) == 3


def test_a_resumed_run_continues_the_same_fid_curve(faces, tmp_path, extractor):
    # one batch an epoch (the 18 training images), so the resumed half sees the batches the straight run did
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    overrides = ["data.batch_size=18", "metrics.images=6"]
    run_training(straight, gan_overrides(faces, *overrides))
    run_training(halves, gan_overrides(faces, *overrides, "trainer.max_steps=2"))
    resumed = run_training(halves, gan_overrides(faces, *overrides, f"ckpt_path={halves}"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def curve(run):
        events = EventAccumulator(str(run / "tensorboard"), purge_orphaned_data=False).Reload()
        return {e.step: e.value for e in events.Scalars("quality/fid")}

    assert sorted(curve(halves)) == [2, 4]
    assert curve(halves) == pytest.approx(curve(straight), rel=1e-4)
    assert resumed["best_fid"] == pytest.approx(min(curve(straight).values()), rel=1e-4)


def test_without_the_weights_a_run_says_so_once_and_trains_on(faces, tmp_path, no_weights, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="genlab"):
        returned = train(compose_config(gan_overrides(faces, "metrics.images=6"), run))
    said = [r.getMessage() for r in caplog.records if "no FID or KID" in r.getMessage()]
    assert len(said) == 1
    assert str(tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in said[0]
    assert "paths.inception_weights=" in said[0] and quality.INCEPTION_URL in said[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert returned is None and metrics["status"] == "completed" and "fid" not in metrics
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]


def test_a_weights_file_that_is_not_there_is_refused_before_anything_is_written(faces, tmp_path):
    run = tmp_path / "run"
    cfg = compose_config(gan_overrides(faces, "metrics.images=6", f"paths.inception_weights={tmp_path}/nowhere.pth"), run)
    with pytest.raises(ConfigError, match=r"paths.inception_weights=.*nowhere.pth: no such file"):
        train(cfg)
    assert not run.exists() or snapshot(run) == {}


def test_a_study_that_minimises_fid_refuses_to_start_without_the_weights(faces, tmp_path, no_weights, monkeypatch):
    from hydra import compose, initialize_config_dir

    from genlab.sweeps import SWEPT_KEYS, SweepReport
    from genlab.cli.train import CONF_DIR

    monkeypatch.delenv(SWEPT_KEYS, raising=False)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=faces_dcgan_optuna", f"data.root={faces}"],
                      return_hydra_config=True)
    with pytest.raises(SystemExit, match="this study minimises FID, but the InceptionV3 weights .* Fetch https://"):
        SweepReport().on_multirun_start(cfg)
