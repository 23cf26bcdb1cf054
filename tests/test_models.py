"""Shape, causality and context tests for every language model."""

import math
from collections import Counter

import pytest
import torch

from genlab.data.names import NamesDataModule
from genlab.data.tokenizer import CharTokenizer
from genlab.models.bigram import Bigram
from genlab.models.gpt import GPT
from genlab.models.mlp import MLP
from genlab.models.recurrent import Recurrent
from genlab.models.wavenet import WaveNet
from genlab.data.module import ready

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz-", boundary=".").to_config()  # V = 28


def make(cls, **kwargs):
    torch.manual_seed(0)
    return cls(tokenizer=TOKENIZER, seq_len=16, **kwargs).eval()


LANGUAGE_MODELS = {
    "bigram": lambda: make(Bigram, counting=False),
    "trigram": lambda: make(Bigram, counting=False, block_size=2),
    "mlp": lambda: make(MLP, block_size=3, n_embd=8, n_hidden=32),
    "wavenet": lambda: make(WaveNet, block_size=8, n_embd=8, n_hidden=16),
    "rnn": lambda: make(Recurrent, cell="rnn", n_embd=8, n_hidden=16),
    "lstm": lambda: make(Recurrent, cell="lstm", n_embd=8, n_hidden=16, n_layers=2),
    "gru": lambda: make(Recurrent, cell="gru", n_embd=8, n_hidden=16),
    "gpt": lambda: make(GPT, n_layer=2, n_head=2, n_embd=16, dropout=0.0),
}


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_shape_and_causality(name):
    model = LANGUAGE_MODELS[name]()
    with torch.no_grad():  # perturb the weights so that no output is trivially constant
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    idx = torch.randint(0, 28, (2, 12))
    logits = model(idx)
    assert logits.shape == (2, 12, 28)
    for t in range(12):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 28
        new = model(changed)
        assert torch.allclose(new[:, :t], logits[:, :t]), f"position {t} leaked into earlier logits"
        assert not torch.allclose(new[:, t], logits[:, t]), f"position {t} does not see its own token"


def test_mlp_sees_exactly_block_size_characters():
    model = make(MLP, block_size=3, n_embd=8, n_hidden=32)
    idx = torch.randint(1, 28, (1, 10))
    base = model(idx)[0, -1]
    far, near = idx.clone(), idx.clone()
    far[0, -4] = (far[0, -4] + 1) % 28  # 4 back: outside a 3-character window
    near[0, -3] = (near[0, -3] + 1) % 28  # 3 back: inside
    assert torch.equal(model(far)[0, -1], base)
    assert not torch.allclose(model(near)[0, -1], base)


def test_first_positions_see_the_notebooks_padded_window():
    """Position t of a name sees '...' -> first letter, '..e' -> second, like the notebook."""
    model = make(MLP, block_size=3, n_embd=8, n_hidden=32)
    name = torch.tensor([[0, 5, 13, 13, 1]])  # '.emma'
    padded = torch.tensor([[0, 0, 0, 5, 13, 13, 1]])  # three start tokens in front
    assert torch.allclose(model(name), model(padded)[:, 2:], atol=1e-6)


def test_counting_bigram_matches_a_direct_count(names_file, tmp_path):
    import lightning as L

    dm = ready(NamesDataModule(data_dir=tmp_path, path=str(names_file), batch_size=8))
    model = Bigram(tokenizer=dm.tokenizer.to_config(), seq_len=dm.seq_len, counting=True, smoothing=1.0)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    expected = torch.zeros(dm.vocab_size, dm.vocab_size)
    counted_names = len(dm.train_dataloader()) * 8  # the one pass covers whole batches
    assert counted_names == 240
    stoi = dm.tokenizer.stoi
    direct = Counter(p for n in dm.splits["train"] for p in zip("." + n, n + "."))
    for (a, b), n in direct.items():
        expected[stoi[a], stoi[b]] = n
    assert torch.equal(model.counts, expected)
    # the loss is the table's negative log-likelihood per character, with add-1 smoothing
    probs = (expected + 1) / (expected + 1).sum(1, keepdim=True)
    nll = -sum(n * math.log(probs[stoi[a], stoi[b]]) for (a, b), n in direct.items()) / sum(direct.values())
    x, y = dm.tensors["train"]
    assert model.loss(model(x), y).item() == pytest.approx(nll, rel=1e-5)


def test_trigram_table_has_v_squared_rows():
    model = make(Bigram, counting=True, block_size=2)
    assert model.counts.shape == (28 * 28, 28)


def test_generate_stops_at_end_token_and_respects_top_k():
    model = make(MLP, block_size=3, n_embd=8, n_hidden=32)
    start = torch.zeros(5, 1, dtype=torch.long)
    # an untrained model ends a name at about 1 token in 28: within 200 every row has (seeded)
    out = model.generate(start, max_new_tokens=200, eos_id=0, generator=torch.Generator().manual_seed(0))
    ends = [row.index(0, 1) for row in out.tolist()]  # each row's first end token (a ValueError if it has none)
    assert out.shape == (5, max(ends) + 1)  # it stopped at the token that ended the last row, not before or after
    top1 = model.generate(start, max_new_tokens=6, top_k=1)
    assert (top1 == top1[0]).all()  # top_k=1 is greedy: every row the same
    with pytest.raises(ValueError, match="temperature"):
        model.generate(start, 3, temperature=0)


def test_wavenet_context_is_its_block_size():
    model = make(WaveNet, block_size=8, n_embd=8, n_hidden=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    idx = torch.randint(1, 28, (1, 14))
    base = model(idx)[0, -1]
    for back, seen in [(9, False), (8, True), (1, True)]:  # 8 back = the oldest character in the window
        changed = idx.clone()
        changed[0, -back] = (changed[0, -back] + 1) % 28
        assert torch.equal(model(changed)[0, -1], base) != seen, back


def test_wavenet_rejects_a_context_that_is_not_a_power_of_two():
    from genlab.errors import ConfigError

    with pytest.raises(ConfigError, match="power of two"):
        make(WaveNet, block_size=6)


def test_wavenet_batchnorm_ignores_padding_in_training():
    model = make(WaveNet, block_size=4, n_embd=8, n_hidden=16).train()
    x = torch.randint(1, 28, (4, 10))
    y = torch.randint(1, 28, (4, 10))
    y[:, 6:] = -1
    garbage = x.clone()
    garbage[:, 6:] = 7  # what stands in the padded positions must not matter
    first = model.training_forward(x, y)[:, :6]
    second = model.training_forward(garbage, y)[:, :6]
    assert torch.allclose(first, second, atol=1e-6)


def test_wavenet_training_gives_no_gradient_from_a_sequences_own_future():
    """In training mode BatchNorm statistics mix sequences; nothing may reward a position for
    reading its own future through them: the gradient of earlier logits w.r.t. a later input is 0."""
    model = make(WaveNet, block_size=4, n_embd=8, n_hidden=16).train()
    x = torch.randint(1, 28, (4, 10))
    y = torch.randint(1, 28, (4, 10))
    saved = {}

    def keep(module, args, output):
        output.retain_grad()
        saved["embedded"] = output

    hook = model.embedding.register_forward_hook(keep)
    logits = model.training_forward(x, y)
    hook.remove()
    logits[0, :7].sum().backward()
    grad = saved["embedded"].grad  # (B, 3 + 10, n_embd): three start tokens in front
    assert grad[0, 3 + 6].abs().sum() > 0  # position 6 matters to its own logits
    assert grad[0, 3 + 7 :].abs().sum() == 0  # positions 7.. do not


@pytest.mark.parametrize("name", ["wavenet", "gpt", "lstm"])
def test_sampling_runs_in_eval_mode_and_restores_training_mode(name):
    model = LANGUAGE_MODELS[name]().train()
    modes = []
    hooks = [m.register_forward_pre_hook(lambda module, args: modes.append(module.training)) for m in model.modules()]
    model.generate(torch.zeros(3, 1, dtype=torch.long), max_new_tokens=5)
    for hook in hooks:
        hook.remove()
    assert modes and not any(modes), "generate() ran the network in training mode"
    assert model.training


def test_recurrent_generation_carries_state_instead_of_rereading():
    model = make(Recurrent, cell="gru", n_embd=8, n_hidden=16)
    lengths = []
    hook = model.rnn.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    model.generate(torch.zeros(2, 5, dtype=torch.long), max_new_tokens=4)
    hook.remove()
    assert lengths == [5, 1, 1, 1]  # the prompt once, then one token at a time


def test_recurrent_state_carries_across_training_chunks():
    model = Recurrent(tokenizer=TOKENIZER, seq_len=8, cell="lstm", n_embd=8, n_hidden=16, sequential=True)
    text = torch.randint(0, 28, (2, 17))
    whole, _ = model.run(text[:, :16])
    first = model.training_forward(text[:, :8], text[:, 1:9])
    second = model.training_forward(text[:, 8:16], text[:, 9:17])
    # two chunks with the carried state = one pass over the whole text
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-5)
    assert not model.carried[0].requires_grad  # truncated: no graph kept across chunks


def test_gpt_loss_at_init_is_close_to_ln_v():
    model = make(GPT, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    idx = torch.randint(0, 28, (8, 16))
    loss = model.loss(model(idx), torch.randint(0, 28, (8, 16)))
    assert abs(loss.item() - math.log(28)) < 0.1


def test_gpt_attention_dropout_defaults_to_dropout_and_can_be_set_apart():
    """model.attention_dropout=0 keeps PyTorch's fused attention on a CPU while the rest drops out."""
    same = make(GPT, n_layer=1, n_head=2, n_embd=16, dropout=0.2)
    apart = make(GPT, n_layer=1, n_head=2, n_embd=16, dropout=0.2, attention_dropout=0.0)
    assert same.blocks[0].attn.attention_dropout == 0.2 and apart.blocks[0].attn.attention_dropout == 0.0
    assert apart.blocks[0].attn.resid_dropout.p == 0.2
    x = torch.randint(0, 28, (2, 16))
    apart.train()
    torch.manual_seed(1)
    first = apart.blocks[0].attn(apart.token_embedding(x))
    apart.blocks[0].attn.resid_dropout.p = 0.0  # with the residual dropout off, attention is deterministic
    assert not torch.equal(first, apart.blocks[0].attn(apart.token_embedding(x)))
    assert torch.equal(apart.blocks[0].attn(apart.token_embedding(x)), apart.blocks[0].attn(apart.token_embedding(x)))


def test_gpt_rejects_heads_that_do_not_divide_the_width():
    from genlab.errors import ConfigError

    with pytest.raises(ConfigError, match="not divisible"):
        make(GPT, n_layer=1, n_head=3, n_embd=16)


def test_wavenet_on_the_notebooks_windows_normalises_exactly_the_notebooks_positions():
    """A batch of 8-character windows with one target each: BatchNorm's statistics come from the
    4, 2 and 1 fused pairs per window the notebook computes, and include the window itself."""
    model = make(WaveNet, block_size=8, n_embd=8, n_hidden=16).train()
    y = torch.full((32, 8), -1)
    y[:, -1] = torch.randint(1, 28, (32,))
    masks = model.needed_positions(y >= 0)
    assert [m.sum(1).unique().tolist() for m in masks] == [[4], [2], [1]]
    # level 1, output j fuses inputs j and j + 1; 7 start tokens stand in front of the window:
    # outputs 7, 9, 11, 13 are the window's pairs (0,1) (2,3) (4,5) (6,7)
    assert masks[0][0].nonzero().flatten().tolist() == [7, 9, 11, 13]

    x = torch.randint(1, 28, (32, 8))
    seen = {}
    hook = model.norms[2].register_forward_pre_hook(lambda module, args: seen.update(h=args[0], mask=args[1]))
    out = model.training_forward(x, y)[:, -1]
    hook.remove()
    top = seen["h"][:, -1]  # the one position of each window at the last level
    expected = (top - top.mean(0)) / torch.sqrt(top.var(0, unbiased=False) + model.norms[2].eps)
    normalised = model.norms[2](seen["h"], seen["mask"], leave_one_out=None)[:, -1]
    assert torch.allclose(normalised, expected * model.norms[2].weight + model.norms[2].bias, atol=1e-5)
    assert out.shape == (32, 28)
