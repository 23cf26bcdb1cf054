"""Shape, causality and context tests for every language model."""

import math
from collections import Counter

import pytest
import torch

from genlab.data.names import NamesDataModule
from genlab.data.tokenizer import CharTokenizer
from genlab.models.bigram import Bigram
from genlab.models.mlp import MLP

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz-", boundary=".").to_config()  # V = 28


def make(cls, **kwargs):
    torch.manual_seed(0)
    return cls(tokenizer=TOKENIZER, seq_len=16, **kwargs).eval()


LANGUAGE_MODELS = {
    "bigram": lambda: make(Bigram, counting=False),
    "trigram": lambda: make(Bigram, counting=False, context=2),
    "mlp": lambda: make(MLP, block_size=3, n_embd=8, n_hidden=32),
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

    dm = NamesDataModule(data_dir=tmp_path, path=str(names_file), batch_size=8)
    model = Bigram(tokenizer=dm.tokenizer.to_config(), seq_len=dm.seq_len, counting=True, smoothing=1.0)
    dm.batches_per_step = 1
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
    model = make(Bigram, counting=True, context=2)
    assert model.counts.shape == (28 * 28, 28)


def test_generate_stops_at_end_token_and_respects_top_k():
    model = make(MLP, block_size=3, n_embd=8, n_hidden=32)
    start = torch.zeros(5, 1, dtype=torch.long)
    out = model.generate(start, max_new_tokens=40, eos_id=0, generator=torch.Generator().manual_seed(0))
    assert out.shape[0] == 5 and out.shape[1] <= 41
    assert all(0 in row[1:] for row in out.tolist()) or out.shape[1] == 41
    top1 = model.generate(start, max_new_tokens=6, top_k=1)
    assert (top1 == top1[0]).all()  # top_k=1 is greedy: every row the same
    with pytest.raises(ValueError, match="temperature"):
        model.generate(start, 3, temperature=0)
