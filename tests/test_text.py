"""Text data: normalisation, tokenizers, cache, windows."""

import torch

from genlab.data.text import TextDataModule, normalise_divina
from genlab.data.tokenizer import GPT2Tokenizer

PASSAGE = """*** START OF THE PROJECT GUTENBERG EBOOK LA DIVINA COMMEDIA ***

LA DIVINA COMMEDIA
di Dante Alighieri

INFERNO

Inferno • Canto I

  Nel mezzo del cammin di nostra vita
mi ritrovai per una selva oscura,
ché la diritta via era smarrita.

  Ahi quanto a dir qual era è cosa dura
esta selva selvaggia e aspra e forte—
che nel pensier rinova la paura!
«E’ l’amor» — disse — «Sì».

*** END OF THE PROJECT GUTENBERG EBOOK LA DIVINA COMMEDIA ***
licence text that must go
"""


def test_normaliser_on_a_small_passage():
    assert normalise_divina(PASSAGE) == (
        "nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura ché la diritta via era "
        "smarrita ahi quanto a dir qual era è cosa dura esta selva selvaggia e aspra e forte che nel "
        "pensier rinova la paura e l amor disse sì"
    )


def test_divina_matches_the_documented_figures(tmp_path, mirror):
    dm = TextDataModule("divina", data_dir=tmp_path, mirror=mirror)
    text = dm.tokenizer.decode(dm.tokens.tolist())
    assert len(text) == 504_402 and dm.vocab_size == 37
    assert text.startswith("nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura")
    assert text.endswith("l amor che move il sole e l altre stelle")
    assert dm.ranges["train"] == (0, int(504_402 * 0.9))


def test_gpt2_encoding_from_the_local_bpe_files(mirror):
    assert GPT2Tokenizer(mirror).encode("nel mezzo del cammin") == [4954, 502, 47802, 1619, 12172, 1084]


def test_tokens_are_cached_and_reused(text_file, tmp_path, monkeypatch):
    first = TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16)
    cached = list((tmp_path / "tokens").glob("*.bin"))
    assert len(cached) == 1
    monkeypatch.setattr(TextDataModule, "_tokenise", lambda *args: (_ for _ in ()).throw(AssertionError("re-read")))
    second = TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16)
    assert torch.equal(torch.from_numpy(first.tokens.astype("int64")), torch.from_numpy(second.tokens.astype("int64")))


def test_a_cache_entry_belongs_to_one_source_and_tokenizer(tmp_path, mirror):
    """A user's file called divina.txt, then the real Divina: the second run must not get the first's tokens."""
    own = tmp_path / "mine" / "divina.txt"
    own.parent.mkdir()
    own.write_text("tanto gentile e tanto onesta pare la donna mia quand ella altrui saluta " * 20, encoding="utf-8")
    cache = tmp_path / "cache"
    users = TextDataModule(name="divina", path=str(own), data_dir=cache, seq_len=16)
    real = TextDataModule(name="divina", data_dir=cache, mirror=mirror, seq_len=16)
    assert len(users.tokens) == len(own.read_text()) and len(real.tokens) == 504_402
    assert users.tokenizer.decode(users.tokens[:5].tolist()) == "tanto"
    assert real.tokenizer.decode(real.tokens[:9].tolist()) == "nel mezzo"
    bpe = TextDataModule(name="divina", data_dir=cache, mirror=mirror, seq_len=16, tokenizer="gpt2")
    assert len(bpe.tokens) < len(real.tokens)  # its own entry, not the characters'
    own.write_text("amor ch a nullo amato amar perdona " * 20, encoding="utf-8")  # same name, new content
    changed = TextDataModule(name="divina", path=str(own), data_dir=cache, seq_len=16)
    assert changed.tokenizer.decode(changed.tokens[:4].tolist()) == "amor"
    assert len(list((cache / "tokens").glob("*.bin"))) == 4


def test_a_cache_entry_cut_short_is_made_again(text_file, tmp_path):
    first = TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16)
    [entry] = (tmp_path / "tokens").glob("*.bin")
    entry.write_bytes(entry.read_bytes()[:100])  # a copy interrupted halfway
    again = TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16)
    assert len(again.tokens) == len(first.tokens) == len(text_file.read_text())


def test_validation_covers_every_target_once_in_order(text_file, tmp_path):
    dm = TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, eval_batch_size=7)
    xs, ys = zip(*dm.val_dataloader())
    targets = torch.cat([y.flatten() for y in ys])
    expected = dm.split_tokens("val")[1:]
    assert torch.equal(targets[targets >= 0], expected)
    assert len(list(dm.val_dataloader())) == len(xs)  # the same batches every time


def test_training_windows_and_sequential_streams(text_file, tmp_path):
    dm = TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, batch_size=4)
    xs, ys, widths = next(iter(dm.train_dataloader()))
    assert xs.shape == (1, 4, 16) and torch.equal(xs[0, :, 1:], ys[0, :, :-1])
    seq = TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, batch_size=4, sampling="sequential")
    assert seq.sequential
    loader = iter(seq.train_dataloader())
    (_, y1, _), (x2, _, _) = next(loader), next(loader)
    assert torch.equal(x2[0, :, 0], y1[0, :, -1])  # each row continues where it stopped
