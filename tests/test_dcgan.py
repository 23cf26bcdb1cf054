"""The DCGAN: network shapes, one step training both networks, step counting, what a run writes,
resume, sampling from a checkpoint, and configs that cannot work."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_config, image_file, run_training
from PIL import Image

from genlab.checkpoints import load_model, read_checkpoint
from genlab.errors import ConfigError, TrainingDiverged
from genlab.models.dcgan import DCGAN, Discriminator, Generator
from genlab.train import train


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
    return ["model=dcgan", "data=celeba", f"data.root={faces}", "data.image_size=16", "data.batch_size=8",
            "data.num_workers=0", "model.ngf=8", "model.ndf=8", "model.nz=12", "model.grid_every=2",
            "model.grid_size=4", "val_every=2", "trainer.max_steps=4", *extra]


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
    from genlab.train import build_model, instantiate

    before = build_model(cfg, instantiate(cfg.data)).state_dict()
    metrics = run_training(run, gan_overrides(faces))

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
    """``train`` returns no validation loss for a model that has none (sweeps skip it)."""
    cfg = compose_config(gan_overrides(faces, "trainer.max_steps=1"), tmp_path / "run")
    assert train(cfg) is None


def test_epochs_count_whole_passes_over_the_images(faces, tmp_path):
    """notebook_dcgan trains by epochs (max_steps=-1): 24 images in batches of 8 are 3 steps an epoch."""
    run = tmp_path / "run"
    metrics = run_training(run, gan_overrides(faces, "trainer.max_steps=-1", "trainer.max_epochs=2"))
    assert metrics["steps"] == 6
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6


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
        ImageFolderDataModule(root=str(tmp_path / "nowhere"), num_workers="many")
