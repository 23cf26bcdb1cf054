"""A step is an optimizer update (genlab.loop.steps): trainer.global_step counts every update however many
one Lightning step makes, under every precision, through the one private Lightning attribute that
genlab relies on, in the Lightning versions the tests have run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.optimizer import register_optimizer_step_post_hook
from conftest import compose_config, run_training
from packaging.specifiers import SpecifierSet
from test_dcgan import faces, gan_overrides  # noqa: F401  (faces is a fixture)

from genlab.run.checkpoints import read_checkpoint
from genlab.data.module import ready
from genlab.loop.steps import (
    FORCED_AUTO_VARIABLE,
    UpdateHook,
    TrainingCurve,
    LIGHTNING_STEP_SECONDS,
    LIGHTNING_TESTED,
    MAX_STEP_SHARE,
    choose_updates_per_step,
    count_update,
    UpdateGroup,
    UpdateGroups,
    validation_check_interval,
)


def test_lightning_is_a_version_the_step_count_was_tested_with():
    assert L.__version__ in SpecifierSet(LIGHTNING_TESTED), (
        f"lightning {L.__version__} is outside {LIGHTNING_TESTED}: check genlab.loop.steps.count_update against it, "
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
        metrics = run_training(tmp_path / "run", [f"data.path={names_file}", "loop.updates_per_step=30",
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


def test_intervals_between_the_two_counts(tmp_path):
    cfg = compose_config(["val_every=1000"], tmp_path)
    assert validation_check_interval(cfg, 200) == 5 and validation_check_interval(cfg, 1) == 1000


def test_the_loop_groups_plain_batches_by_k_and_gives_them_back_as_they_were():
    """Batches of different widths (names) stack padded to the widest and come back trimmed; every
    group holds K, a group at the end of a pass taking the rest from the next pass."""
    plain = [(torch.full((2, w), w), torch.full((2, w), w)) for w in (3, 5, 2, 4, 1)]
    groups = UpdateGroups(plain, 2)
    assert len(groups) == 2  # a Lightning epoch: about one pass
    epochs = [list(groups), list(groups)]
    items = [item for epoch in epochs for item in epoch]
    assert all(isinstance(item, UpdateGroup) and len(item.xs) == 2 for item in items)
    assert items[0].xs.shape == (2, 2, 5) and (items[0].ys[0, :, 3:] == -1).all()  # padding predicts nothing
    back = [batch for item in items for batch in item.batches()]
    expected = (plain * 2)[:8]  # 3 5 | 2 4 || 1 3 | 5 2: the second epoch goes on where the first stopped
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(back, expected)) and len(back) == 8


@pytest.mark.parametrize("seed", range(20))
def test_any_stream_grouped_by_any_k_gives_every_batch_once_in_order_k_at_a_time(seed):
    """Random streams (lengths, widths with trailing padding) and random K, over several epochs:
    every group holds K batches, and the groups' batches, trimmed, are the stream's, pass after pass."""
    g = torch.Generator().manual_seed(seed)
    length, k, epochs = (int(torch.randint(1, 9, (1,), generator=g)) for _ in range(3))
    width = int(torch.randint(2, 7, (1,), generator=g))
    plain = []
    for i in range(length):
        y = torch.full((3, width), i)
        y[:, int(torch.randint(1, width + 1, (1,), generator=g)):] = -1  # trailing padding
        plain.append((y.clamp(min=0), y))
    groups = UpdateGroups(plain, k)
    seen = [batch for _ in range(epochs) for group in groups for batch in group.batches()]
    assert all(len(group.xs) == k for group in groups)
    assert len(seen) == epochs * len(groups) * k
    for position, (x, y) in enumerate(seen):
        expected = plain[position % length][1]
        real = int((expected >= 0).any(0).sum())
        assert torch.equal(y, expected[:, :real]) and x.shape == y.shape


class CountUpdates(L.Callback, UpdateHook):
    """Records the update numbers the loop calls it at, and that each comes before and after its update."""

    def __init__(self, every: int):
        self.every_n_updates, self.calls = every, []

    def before_update(self, trainer, module, update):
        self.calls.append(("before", update, trainer.global_step))

    def after_update(self, trainer, module, update):
        self.calls.append(("after", update, trainer.global_step))


@pytest.mark.parametrize("k", [1, 4, 10])
def test_an_update_hook_is_called_around_every_nth_update_whatever_k(names_file, tmp_path, k, monkeypatch):
    from genlab.cli import train as train_module

    hook, build = CountUpdates(every=6), train_module.build_trainer

    def with_hook(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(hook)
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", with_hook)
    run_training(tmp_path / "run", [f"data.path={names_file}", f"loop.updates_per_step={k}", "trainer.max_steps=40",
                                    "val_every=20", "num_samples=0", "logger=none", "callbacks.insight=null"])
    due = range(6, 41, 6)
    assert hook.calls == [c for u in due for c in (("before", u, u - 1), ("after", u, u))]


def test_auto_trains_exactly_as_a_fixed_count_and_keeps_its_count_on_resume(names_file, tmp_path):
    common = [f"data.path={names_file}", "trainer.max_steps=120", "val_every=60", "num_samples=0", "logger=none",
              "callbacks.insight=null"]
    fixed = run_training(tmp_path / "fixed", [*common, "loop.updates_per_step=1"])
    auto = run_training(tmp_path / "auto", [*common, "loop.updates_per_step=auto"])
    assert auto["val_loss"] == fixed["val_loss"] and auto["test_loss"] == fixed["test_loss"]
    chosen = read_checkpoint(tmp_path / "auto")["genlab"]["updates_per_step"]
    assert isinstance(chosen, int) and 60 % chosen == 0

    # a resume keeps the count (Lightning's restored step count then still validates on multiples of 60)
    resumed = run_training(tmp_path / "auto", [*common, "loop.updates_per_step=auto", "trainer.max_steps=240",
                                               f"ckpt_path={tmp_path / 'auto'}"])
    assert resumed["steps"] == 240 and read_checkpoint(tmp_path / "auto")["genlab"]["updates_per_step"] == chosen


@pytest.mark.parametrize("update_seconds", [1e-4, 7.4e-4, 5e-3, 0.047, 0.33])
def test_auto_keeps_lightnings_share_under_two_percent_where_val_every_allows(update_seconds):
    for val_every in (1000, 250, 20_000):
        k = choose_updates_per_step(update_seconds, val_every)
        assert val_every % k == 0
        share = LIGHTNING_STEP_SECONDS / (LIGHTNING_STEP_SECONDS + k * update_seconds)
        assert share <= MAX_STEP_SHARE or k == val_every  # val_every itself is the most a step may hold
        if k > 1:  # and no fewer updates would do
            smaller = max(d for d in range(1, k) if val_every % d == 0)
            assert LIGHTNING_STEP_SECONDS / (LIGHTNING_STEP_SECONDS + smaller * update_seconds) > MAX_STEP_SHARE


@pytest.mark.slow
def test_auto_times_the_compiled_update_where_training_will_compile_it(names_file, tmp_path, monkeypatch):
    """With loop.compile, auto's count comes from the compiled update (several times faster on a small
    model: timed eager, the count would leave Lightning a larger share). One graph is compiled; the
    model and the random stream are left as they were."""
    import torch

    import genlab.models.base
    import genlab.models.compiled_update as compiled_update
    from genlab.loop.steps import measure_update_seconds
    from genlab.cli.train import build_model, instantiate

    made, compiled = [], []

    class Spy(compiled_update.CompiledUpdate):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def counting_filter(entries):  # torch.compile filters a graph's checks once, as it compiles it
        compiled.append(1)
        return guards_that_can_change(entries)

    guards_that_can_change = compiled_update.guards_that_can_change
    monkeypatch.setattr(compiled_update, "guards_that_can_change", counting_filter)
    monkeypatch.setattr(genlab.models.base, "CompiledUpdate", Spy)
    cfg = compose_config([f"data.path={names_file}", "loop.compile=true"], tmp_path / "run")
    datamodule = ready(instantiate(cfg.data))
    model = build_model(cfg, datamodule)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    random_state = torch.get_rng_state()

    assert measure_update_seconds(model, datamodule) > 0
    assert len(made) == 1 and len(compiled) == 1  # every probe batch padded to one width
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert torch.equal(random_state, torch.get_rng_state())


def train_curve(run_dir) -> list[tuple[int, float]]:
    """The ``loss/train`` points of a run's event files: (update, value)."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0},
                              purge_orphaned_data=False).Reload()
    return sorted((e.step, e.value) for e in events.Scalars("loss/train"))


def test_the_training_curve_does_not_depend_on_the_updates_per_step(names_file, tmp_path):
    """Whatever K a machine's speed makes auto choose, a run writes the same curve points and the same
    final losses; a run resumed in the middle of a curve window draws the same points too."""
    common = [f"data.path={names_file}", "trainer.max_steps=140", "val_every=70", "trainer.log_every_n_steps=20",
              "num_samples=0", "callbacks.insight=null"]
    runs = {}
    for k in ("1", "7", "auto"):
        runs[k] = run_training(tmp_path / k, [*common, f"loop.updates_per_step={k}"])
    run_training(tmp_path / "resumed", [*common, "loop.updates_per_step=7", "trainer.max_steps=70"])
    runs["resumed"] = run_training(tmp_path / "resumed", [*common, "loop.updates_per_step=7",
                                                          f"ckpt_path={tmp_path / 'resumed'}"])
    curve = train_curve(tmp_path / "1")
    assert [step for step, _ in curve] == list(range(20, 141, 20))  # 60 -> 80 spans the resume at 70
    assert curve[0][1] > curve[-1][1] + 0.3  # it is a training curve: the loss falls
    for k, metrics in runs.items():
        assert train_curve(tmp_path / k) == curve, k
        assert [metrics[key] for key in ("val_loss", "best_val_loss", "test_loss")] == \
               [runs["1"][key] for key in ("val_loss", "best_val_loss", "test_loss")], k


def test_each_point_is_the_mean_of_its_window_of_updates():
    curve = TrainingCurve(every=3)
    losses = [torch.tensor(float(v)) for v in range(1, 8)]  # updates 1..7
    assert curve.add(losses[:2], last_update=2) == []
    assert curve.add(losses[2:7], last_update=7) == [(3, 2.0), (6, 5.0)]  # a step holding two points
    assert curve.state() == [7.0]  # the open window, kept in checkpoints
    resumed = TrainingCurve(every=3)
    resumed.restore(curve.state())
    assert resumed.add([torch.tensor(8.0), torch.tensor(9.0)], last_update=9) == [(9, 8.0)]


@pytest.mark.parametrize("forced, expected", [("min", 1), ("max", 60)])
def test_auto_can_be_forced_to_its_smallest_and_largest_count(names_file, tmp_path, monkeypatch, forced, expected):
    monkeypatch.setenv(FORCED_AUTO_VARIABLE, forced)
    run_training(tmp_path / "run", [f"data.path={names_file}", "trainer.max_steps=60", "val_every=60",
                                    "num_samples=0", "logger=none", "callbacks.insight=null"])
    assert read_checkpoint(tmp_path / "run")["genlab"]["updates_per_step"] == expected
