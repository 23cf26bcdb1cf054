import hashlib
import itertools

import torch
from conftest import training_loop

from genlab.data.module import ready
from genlab.data.names import CleaningReport, NamesDataModule, clean_names
from genlab.data.tokenizer import CharTokenizer
from genlab.loop.steps import batches_of


def test_cleaning_rules_on_a_small_list():
    raw = "\n".join([
        "-- DISCLAIMER --", "made automatically", "----------------", "",
        "maria", "gian  luca", "felicit‡", "niccolÚ", "niccolo", "fatima  ap.", "nicolo'", "", "maria", "  anna ",
    ])
    names, report = clean_names(raw, gist=True)  # the gist's disclaimer, ended by a line of dashes
    assert names == ["maria", "gian-luca", "felicita", "niccolo", "anna"]
    assert report == CleaningReport(raw=9, repaired=2, punctuation=2, digits=0, too_long=0, duplicates=2, kept=5)
    assert str(report) == ("names: 9 entries -> 5 names (repaired mis-encoded accents in 2; dropped 2 with "
                           "punctuation or symbols, 2 duplicates)")


def test_a_word_list_of_your_own_keeps_its_letters():
    raw = "\n".join(["José", "Zoë", "Jürgen", "Ñandú", "李", "Αλέξανδρος", "Дмитрий", "अनीता", "O'Brien",
                     "Jose\u0301",  # José spelt with a combining accent: the same name
                     "anna2", "r2d2", "j.r.", "ann@", "zoë", "", "Mary Ann"])
    names, report = clean_names(raw)
    assert names == ["josé", "zoë", "jürgen", "ñandú", "李", "αλέξανδρος", "дмитрий", "अनीता", "o'brien", "mary-ann"]
    assert report == CleaningReport(raw=16, repaired=0, punctuation=2, digits=2, too_long=0, duplicates=2, kept=10)
    assert "dropped 2 with punctuation or symbols, 2 with digits, 2 duplicates" in str(report)
    cased, _ = clean_names(raw, lowercase=False)
    assert cased[:2] == ["José", "Zoë"] and "zoë" in cased  # Zoë and zoë: two names


# sha256 of the mirror's names/nomi_italiani.clean.txt (its README): the course's 9,101 names, one a line
CLEAN_LIST_SHA256 = "f595282b452a8c041b0ce82a1653b912f0e8fe32f3c02b2288f38533982e663a"


def test_real_names_match_the_documented_clean_list(tmp_path, mirror):
    dm = ready(NamesDataModule(data_dir=tmp_path, mirror=mirror))
    assert hashlib.sha256(("\n".join(dm.names) + "\n").encode()).hexdigest() == CLEAN_LIST_SHA256
    assert len(dm.names) == 9101
    assert dm.tokenizer.chars == ".-abcdefghijklmnopqrstuvwxyz"
    assert dm.max_len == len("marie-odette-rose-gabrielle")
    assert "9,118 entries -> 9,101 names" in str(dm.report)


def test_split_is_deterministic_disjoint_and_80_10_10(names_file, tmp_path):
    a = ready(NamesDataModule(data_dir=tmp_path, path=str(names_file), seed=3))
    b = ready(NamesDataModule(data_dir=tmp_path, path=str(names_file), seed=3))
    c = ready(NamesDataModule(data_dir=tmp_path, path=str(names_file), seed=4))
    assert a.splits == b.splits
    assert a.splits["train"] != c.splits["train"]
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sizes == {"train": 240, "val": 30, "test": 30}
    assert set(a.splits["train"]).isdisjoint(a.splits["val"]) and set(a.splits["val"]).isdisjoint(a.splits["test"])


def test_vocabulary_round_trip_and_boundary_token():
    tok = CharTokenizer.from_text("gian-luca", boundary=".")
    assert tok.chars[0] == "." and tok.eos_id == 0
    assert tok.decode(tok.encode("luca-gian")) == "luca-gian"
    restored = CharTokenizer(**{k: v for k, v in tok.to_config().items() if k != "type"})
    assert restored.encode("gian") == tok.encode("gian")


def test_batches_are_start_token_shifted_and_padded_with_minus_one(names_file, tmp_path):
    dm = ready(NamesDataModule(data_dir=tmp_path, path=str(names_file), batch_size=8))
    dm.trainer = training_loop().trainer
    for batch in itertools.islice(dm.train_dataloader(), 3):  # one batch per update, trimmed by the loop
        (xs, ys), = batches_of(batch)
        assert xs.shape[0] == 8 and xs.shape == ys.shape
        assert (xs[:, 0] == 0).all()  # every sequence starts with '.'
        for x, y in zip(xs, ys):
            n = int((y >= 0).sum())  # the name and its end token
            assert y[n - 1] == 0 and (y[n:] == -1).all()
            assert torch.equal(x[1:n], y[: n - 1])  # y is x shifted by one
        assert xs.shape[1] == int((ys >= 0).sum(1).max())  # trimmed by the loop to its longest name + 1


def test_window_sampling_gives_every_training_character_once_with_its_context(names_file, tmp_path):
    dm = ready(NamesDataModule(data_dir=str(tmp_path), path=str(names_file), sampling="windows", block_size=8))
    x, y = dm.training_windows()
    names = dm.splits["train"]
    assert len(x) == sum(len(n) + 1 for n in names)  # each character and the end of each name
    assert x.shape[1] == 8 and (y[:, :-1] == -1).all() and (y[:, -1] >= 0).all()
    decode = dm.tokenizer.decode
    first = names[0]
    assert decode(x[0].tolist()) == "." * 8 and decode([y[0, -1].item()]) == first[0]  # '........' -> first letter
    k = len(first)
    assert decode(x[k].tolist()) == ("." * 8 + first)[-8:] and y[k, -1].item() == dm.tokenizer.eos_id


def test_unknown_sampling_is_refused(names_file, tmp_path):
    import pytest

    from genlab.errors import ConfigError

    with pytest.raises(ConfigError, match="data.sampling=chunks"):
        ready(NamesDataModule(data_dir=str(tmp_path), path=str(names_file), sampling="chunks"))


def test_accented_and_non_latin_names_sample_back_with_their_letters(tmp_path):
    from conftest import run_training
    from genlab.cli.sample import sample
    from hydra import compose, initialize_config_dir
    from genlab.cli.train import CONF_DIR

    stems = ["josé", "zoë", "jürgen", "ñandú", "李白", "王芳", "дмитрий", "αλέξανδρος", "अनीता", "anna"]
    names = [a + "-" + b for a in stems for b in stems if a != b]  # 90 names over their letters
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    run_training(tmp_path / "run", ["model=bigram", f"data.path={path}", "data.batch_size=8", "trainer.max_steps=300",
                                    "val_every=300", "logger=none", "num_samples=0", "optimizer.lr=0.3"])
    letters = set("".join(names))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt_path={tmp_path / 'run'}", "num_samples=200"])
    samples = sample(cfg)
    sampled = set("".join(samples))
    assert sampled <= letters  # nothing but the list's own characters
    assert {"é", "ë", "ü", "ñ", "李", "д", "λ", "अ"} <= sampled  # accented and non-Latin letters come back
