"""loop.compile=true: the whole update compiled as one graph trains exactly what the eager update
trains (the same losses, parameters, BatchNorm statistics and optimizer state), whatever the
optimizer's settings and the batch widths; options it does not write out are refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from genlab.errors import ConfigError
from genlab.models.compiled_update import CompiledUpdate
from genlab.models.gpt import GPT
from genlab.models.mlp import MLP
from genlab.models.wavenet import WaveNet

TOKENIZER = {"type": "char", "chars": list(".abcdefghijklmnopqrstuvwxyz")}


def batches(count: int, widths: list[int], rows: int = 8, seed: int = 1):
    """Random batches of the given widths in turn, each target the token after its input's (a rule to
    learn); the first row's second half is padding (-1). Each is a view into a wider tensor, as the
    model's batches are views into their training item."""
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        width = widths[i % len(widths)]
        x = torch.randint(0, 27, (rows, width + 3), generator=generator)
        y = (x + 1) % 27
        y[0, width // 2:] = -1
        yield x[:, :width], y[:, :width]


def train_both(model, make_optimizer, clip, widths, count=12, order=None):
    """The same updates, eager and compiled (every width compiled up front), on batches of the
    widths in turn (or of ``order``'s); both models, the compiled update and each side's losses."""
    torch.manual_seed(0)
    model.train()
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    eager_optimizer, compiled_optimizer = make_optimizer(eager), make_optimizer(compiled)
    update = CompiledUpdate(compiled, compiled_optimizer, clip, widths=widths)
    eager_losses, compiled_losses = [], []
    for x, y in batches(count, order or widths):
        loss = eager.loss(eager.training_forward(x, y), y)
        eager_optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(eager.parameters(), clip)
        eager_optimizer.step()
        eager_losses.append(loss.item())
        compiled_losses.append(update(x, y).item())
        for optimizer in (eager_optimizer, compiled_optimizer):  # as a scheduler would: no recompilation
            for group in optimizer.param_groups:
                group["lr"] *= 0.95
    return eager, compiled, update, eager_losses, compiled_losses


def assert_same_state(eager, compiled, atol=1e-6):
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=atol), name


def test_sgd_with_momentum_weight_decay_and_nesterov_trains_the_same_mlp():
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    eager, compiled, update, eager_losses, compiled_losses = train_both(MLP(tokenizer=TOKENIZER, seq_len=8), sgd, None, [8])
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert eager_losses[-1] < eager_losses[0]  # it trained
    assert_same_state(eager, compiled)
    assert not update.widths  # compiled up front and put back: the losses above show nothing else changed


def test_a_scheduler_after_a_compiled_update_warns_nothing_genlab_shows():
    """The compiled update does not call optimizer.step(), which torch's schedulers look for: their
    "lr_scheduler.step() before optimizer.step()" warning is silenced where genlab silences warnings
    (genlab.console), and the rate moves as the schedule says."""
    import genlab.console  # noqa: F401  (its filters are the ones every entry point installs)

    model = MLP(tokenizer=TOKENIZER, seq_len=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    update = CompiledUpdate(model, optimizer, None, widths=[8])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = next(batches(1, [8], seed=3))
    with warnings.catch_warnings(record=True) as caught:
        update(x, y)
        scheduler.step()
    assert [str(w.message) for w in caught] == []
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.slow
def test_a_new_thread_count_midway_still_trains():
    """The graphs run without guard checks: one compiled at another thread count must still run
    (a sweep gives each job its own threads)."""
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)
    *_, update, _, compiled_losses = train_both(MLP(tokenizer=TOKENIZER, seq_len=8), sgd, None, [8], count=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        x, y = next(batches(1, [8], seed=2))
        assert torch.isfinite(update(x, y))
    finally:
        torch.set_num_threads(threads)


def test_refuses_what_it_does_not_write_out():
    model = MLP(tokenizer=TOKENIZER, seq_len=8)
    with pytest.raises(ConfigError, match="not RMSprop"):
        CompiledUpdate(model, torch.optim.RMSprop(model.parameters()), None)
    with pytest.raises(ConfigError, match="dampening"):
        CompiledUpdate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1), None)


def test_adam_with_amsgrad_weight_decay_and_clipping_trains_the_same_mlp():
    """The step is torch's own functional Adam: its options hold as in torch.optim.Adam."""
    adam = lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True, weight_decay=1e-3)
    eager, compiled, update, eager_losses, compiled_losses = train_both(MLP(tokenizer=TOKENIZER, seq_len=8), adam, 1.0, [8])
    # torch's compiled Adam (capturable) takes its bias corrections in tensors: rounding differs a little
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert_same_state(eager, compiled, atol=1e-4)
    assert update.optimizer.state[compiled.head.weight]["max_exp_avg_sq"].abs().sum() > 0


@pytest.mark.slow
def test_wavenet_batchnorm_statistics_and_varying_widths_match_eager():
    model = WaveNet(tokenizer=TOKENIZER, seq_len=16)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)
    eager, compiled, update, eager_losses, compiled_losses = train_both(model, sgd, None, [5, 16, 11])
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert_same_state(eager, compiled)  # running_mean / running_var included
    assert eager.norms[0].running_mean.abs().sum() > 0


@pytest.mark.slow
def test_adamw_with_clipping_and_parameter_groups_trains_the_same_gpt():
    model = GPT(tokenizer=TOKENIZER, seq_len=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    adamw = lambda m: torch.optim.AdamW(m.parameter_groups(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    eager, compiled, update, eager_losses, compiled_losses = train_both(model, adamw, 0.5, [16])
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert_same_state(eager, compiled, atol=1e-3)  # Adam divides by small numbers: rounding grows
    state = update.optimizer.state[compiled.head.weight]
    assert float(state["step"]) == 12  # torch.optim's own state, as a checkpoint keeps it


def test_an_unknown_compile_mode_is_refused_before_the_run_starts(tmp_path, names_file):
    from conftest import compose_config

    from genlab.cli.train import train

    cfg = compose_config([f"data.path={names_file}", "loop.compile=fastest"], tmp_path / "run")
    with pytest.raises(ConfigError, match="loop.compile=fastest: use false, true or one of torch.compile's modes"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_any_order_of_widths_runs_each_widths_own_graph(seed):
    """The graphs keep only the checks on the batch (guards_that_can_change): for a random order of
    widths, each update still runs its own width's graph and trains what the eager update trains;
    names up to 71 letters give 9 padded widths, past torch.compile's default limit of 8 graphs."""
    import random

    draw = random.Random(seed)
    widths = [draw.randint(2, 72) for _ in range(14)]
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    eager, compiled, _, eager_losses, compiled_losses = train_both(
        MLP(tokenizer=TOKENIZER, seq_len=72), sgd, None, list(range(2, 73)), count=len(widths), order=widths)
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert_same_state(eager, compiled)
