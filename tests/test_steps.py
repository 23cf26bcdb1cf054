"""A step is an optimizer update (genlab.steps): trainer.global_step counts every update however many
one Lightning step makes, under every precision, through the one private Lightning attribute that
genlab relies on, in the Lightning versions the tests have run."""

from __future__ import annotations

import lightning as L
from torch.optim.optimizer import register_optimizer_step_post_hook
from conftest import run_training
from packaging.specifiers import SpecifierSet
from test_dcgan import faces, gan_overrides  # noqa: F401  (faces is a fixture)

from genlab.checkpoints import read_checkpoint
from genlab.steps import LIGHTNING_TESTED, count_update, due_update, lightning_steps


def test_lightning_is_a_version_the_step_count_was_tested_with():
    assert L.__version__ in SpecifierSet(LIGHTNING_TESTED), (
        f"lightning {L.__version__} is outside {LIGHTNING_TESTED}: check genlab.steps.count_update against it, "
        "run the suite, then widen LIGHTNING_TESTED and pyproject.toml together")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress  # the private counter
    count_update(trainer)
    # what trainer.global_step reads under manual optimization (the fit below checks that it does)
    assert progress.total.completed == 1


def test_global_step_counts_every_update_of_every_lightning_step(names_file, tmp_path):
    updates = []
    handle = register_optimizer_step_post_hook(lambda *args: updates.append(1))
    try:
        metrics = run_training(tmp_path / "run", [f"data.path={names_file}", "model.updates_per_step=30",
                                                  "trainer.max_steps=100", "val_every=30", "num_samples=0",
                                                  "logger=none", "callbacks.insight=null"])
    finally:
        handle.remove()
    # 100 updates in Lightning steps of 30: the last step makes only the 10 that are left
    assert metrics["steps"] == 100 and len(updates) == 100


def test_a_gan_step_is_one_step_under_16_mixed_too(faces, tmp_path):  # noqa: F811
    """16-mixed takes the gradient scaler's path; the discriminator's update is not counted there either."""
    plugin = "+trainer.plugins=[{_target_: lightning.pytorch.plugins.MixedPrecision, precision: 16-mixed, device: cpu}]"
    metrics = run_training(tmp_path / "run", gan_overrides(faces, "trainer.precision=null", plugin, "logger=none"))
    checkpoint = read_checkpoint(tmp_path / "run")
    assert metrics["steps"] == 4 and len(checkpoint["genlab"]["history"]) == 4  # one step per batch, not per update
    assert checkpoint["MixedPrecision"]["scale"] < 65536.0  # the scaler was used (and backed off from its start)


def test_intervals_between_the_two_counts():
    assert lightning_steps(1000, 200) == 5 and lightning_steps(100, 1) == 100
    assert due_update(first=201, updates=200, every=300) == 300
    assert due_update(first=301, updates=200, every=1000) is None
    assert due_update(first=1, updates=1, every=1) == 1
