"""Text data: normalisation, tokenizers, cache, windows."""

from pathlib import Path

import numpy as np
import pytest
import torch

from genlab.data import tokens as token_files
from genlab.data.text import TextDataModule, normalise_divina
from genlab.data.tokenizer import GPT2Tokenizer
from genlab.errors import DataError
from genlab.data.module import ready

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
    dm = ready(TextDataModule("divina", data_dir=tmp_path, mirror=mirror))
    text = dm.tokenizer.decode(dm.tokens.tolist())
    assert len(text) == 504_402 and dm.vocab_size == 37
    assert text.startswith("nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura")
    assert text.endswith("l amor che move il sole e l altre stelle")
    assert dm.ranges["train"] == (0, int(504_402 * 0.9))


def test_gpt2_encoding_from_the_local_bpe_files(mirror):
    assert GPT2Tokenizer(mirror).encode("nel mezzo del cammin") == [4954, 502, 47802, 1619, 12172, 1084]


def test_tokens_are_cached_and_reused(text_file, tmp_path, monkeypatch):
    first = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16))
    cached = list((tmp_path / "tokens").glob("*.bin"))
    assert len(cached) == 1
    monkeypatch.setattr(TextDataModule, "_tokenise", lambda *args: (_ for _ in ()).throw(AssertionError("re-read")))
    second = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16))
    assert torch.equal(torch.from_numpy(first.tokens.astype("int64")), torch.from_numpy(second.tokens.astype("int64")))


def test_a_cache_entry_belongs_to_one_source_and_tokenizer(tmp_path, mirror):
    """A user's file called divina.txt, then the real Divina: the second run must not get the first's tokens."""
    own = tmp_path / "mine" / "divina.txt"
    own.parent.mkdir()
    own.write_text("tanto gentile e tanto onesta pare la donna mia quand ella altrui saluta " * 20, encoding="utf-8")
    cache = tmp_path / "cache"
    users = ready(TextDataModule(name="divina", path=str(own), data_dir=cache, seq_len=16))
    real = ready(TextDataModule(name="divina", data_dir=cache, mirror=mirror, seq_len=16))
    assert len(users.tokens) == len(own.read_text()) and len(real.tokens) == 504_402
    assert users.tokenizer.decode(users.tokens[:5].tolist()) == "tanto"
    assert real.tokenizer.decode(real.tokens[:9].tolist()) == "nel mezzo"
    bpe = ready(TextDataModule(name="divina", data_dir=cache, mirror=mirror, seq_len=16, tokenizer="gpt2"))
    assert len(bpe.tokens) < len(real.tokens)  # its own entry, not the characters'
    own.write_text("amor ch a nullo amato amar perdona " * 20, encoding="utf-8")  # same name, new content
    changed = ready(TextDataModule(name="divina", path=str(own), data_dir=cache, seq_len=16))
    assert changed.tokenizer.decode(changed.tokens[:4].tolist()) == "amor"
    assert len(list((cache / "tokens").glob("*.bin"))) == 4


def test_a_cache_entry_cut_short_is_made_again(text_file, tmp_path):
    first = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16))
    [entry] = (tmp_path / "tokens").glob("*.bin")
    entry.write_bytes(entry.read_bytes()[:100])  # a copy interrupted halfway
    again = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16))
    assert len(again.tokens) == len(first.tokens) == len(text_file.read_text())


def test_validation_covers_every_target_once_in_order(text_file, tmp_path):
    dm = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, eval_batch_size=7))
    xs, ys = zip(*dm.val_dataloader())
    targets = torch.cat([y.flatten() for y in ys])
    expected = torch.from_numpy(dm.split_tokens("val")[1:].astype("int64"))
    assert torch.equal(targets[targets >= 0], expected)
    assert dm.evaluation_scope("val") == {"tokens": len(expected), "whole_split": True,
                                          "description": f"val: the whole split, {len(expected):,} tokens"}
    assert len(list(dm.val_dataloader())) == len(xs)  # the same batches every time


def test_training_windows_and_sequential_streams(text_file, tmp_path):
    dm = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, batch_size=4))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    seq = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, batch_size=4, sampling="sequential"))
    assert seq.sequential
    loader = iter(seq.train_dataloader())
    (_, y1), (x2, _) = next(loader), next(loader)
    assert torch.equal(x2[:, 0], y1[:, -1])  # each row continues where it stopped


# spaces, runs of blank lines, tabs, \r\n, contractions, digits, accents, CJK and an emoji: the
# places where cutting a text into chunks could change its tokens
MIXED = ("Nel mezzo del cammin di nostra vita\r\nmi ritrovai per una selva oscura,\n\n\n"
         "ché la diritta via era smarrita. It's 1300 A.D.\t\tDon't  stop;  \u674e\u767d  \u00e8 \U0001F600 ok\n")


def test_chunked_tokens_are_those_of_the_whole_text(tmp_path, monkeypatch, mirror):
    """Chunks of 64 bytes (over 100 cuts), a byte-order mark: the same tokens as encoding the
    whole text at once, for characters and GPT-2 BPE."""
    text = MIXED * 12
    source = tmp_path / "mixed.txt"
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())
    monkeypatch.setattr(token_files, "CHUNK_BYTES", 64)
    chars = ready(TextDataModule(path=str(source), data_dir=tmp_path / "c", seq_len=8))
    plain = text.replace("\r\n", "\n")  # as open() reads it
    assert chars.tokenizer.decode(chars.tokens.tolist()) == plain and chars.tokens.dtype == np.uint16
    bpe = ready(TextDataModule(path=str(source), data_dir=tmp_path / "b", seq_len=8, tokenizer="gpt2", mirror=mirror))
    assert bpe.tokens.tolist() == GPT2Tokenizer(mirror).encode(plain)


def test_a_folder_of_texts_in_name_order_with_a_separator(tmp_path, mirror):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "b.txt").write_text("secondo libro " * 20)
    (folder / "a.txt").write_text("primo libro " * 20)
    (folder / "notes.md").write_text("not a text of the corpus")
    chars = ready(TextDataModule(path=str(folder), data_dir=tmp_path / "c", seq_len=8))
    assert chars.tokenizer.decode(chars.tokens.tolist()) == "primo libro " * 20 + "\n\n" + "secondo libro " * 20
    bpe = ready(TextDataModule(path=str(folder), data_dir=tmp_path / "b", seq_len=8, tokenizer="gpt2", mirror=mirror))
    encode = GPT2Tokenizer(mirror).encode
    assert bpe.tokens.tolist() == encode("primo libro " * 20) + [50256] + encode("secondo libro " * 20)
    (folder / "a.txt").write_text("primo libro, riscritto " * 20)  # new content: a new cache entry
    again = ready(TextDataModule(path=str(folder), data_dir=tmp_path / "c", seq_len=8))
    assert again.tokenizer.decode(again.tokens[:8].tolist()) == "primo li" and len(again.tokens) != len(chars.tokens)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="is a folder without .txt files"):
        ready(TextDataModule(path=str(empty), data_dir=tmp_path / "c"))


def test_a_vocabulary_above_65536_characters_is_stored_in_32_bits(tmp_path):
    symbols = "".join(chr(0x20000 + i) for i in range(70_000))  # beyond the Basic Multilingual Plane
    source = tmp_path / "many.txt"
    source.write_text(symbols + symbols[::-1], encoding="utf-8")
    dm = ready(TextDataModule(path=str(source), data_dir=tmp_path, seq_len=8))
    assert dm.vocab_size == 70_000 and dm.tokens.dtype == np.uint32
    assert dm.tokens.max() == 69_999 and dm.tokenizer.decode(dm.tokens[-3:].tolist()) == symbols[:3][::-1]


def test_a_large_split_is_sampled_the_same_way_every_time(text_file, tmp_path):
    dm = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, eval_batch_size=4, val_tokens=200))
    first = [y for _, y in dm.val_dataloader()]
    again = [y for _, y in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    targets = torch.cat([y.flatten() for y in first])
    assert len(targets) == (targets >= 0).sum() == 192  # 12 whole windows of 16: at most val_tokens
    start, end = dm.ranges["val"]
    scope = dm.evaluation_scope("val")
    assert scope["tokens"] == 192 and not scope["whole_split"] and f"of its {end - start - 1:,} tokens" in scope["description"]
    starts = dm._window_starts("val")
    assert starts[0] == start and starts[-1] == end - 17 and (np.diff(starts) >= 16).all()  # spread over the split
    # data.final_whole_split: the final figures ask for the whole split, the module itself stays as it is
    assert dm.evaluation_scope("val", whole_split=True) == {"tokens": end - start - 1, "whole_split": True,
                                                            "description": f"val: the whole split, {end - start - 1:,} tokens"}
    whole = torch.cat([y.flatten() for _, y in dm.val_dataloader(whole_split=True)])
    assert (whole >= 0).sum() == end - start - 1 and dm.evaluation_scope("val") == scope


def test_characters_covered_by_bpe_windows_are_exact(tmp_path, mirror):
    """Bits per character count the characters of the evaluated targets (the model sums
    ``characters_per_token`` over them): over a whole split that is the split's text, exactly."""
    source = tmp_path / "mixed.txt"
    source.write_text(MIXED * 40, encoding="utf-8")
    dm = ready(TextDataModule(path=str(source), data_dir=tmp_path, seq_len=8, tokenizer="gpt2", mirror=mirror))
    start, end = dm.ranges["val"]
    covered = dm.tokenizer.decode(dm.tokens[start + 1 : end].tolist())  # every target of the split
    table = dm.tokenizer.characters_per_token()
    targets = torch.cat([y.flatten() for _, y in dm.val_dataloader()])
    assert sum(table[t] for t in targets[targets >= 0].tolist()) == len(covered)


@pytest.mark.parametrize("final_whole_split", [False, True])
def test_metrics_say_what_the_final_figures_cover(text_file, tmp_path, final_whole_split):
    """metrics.json says what its figures cover, and eval.py measures the checkpoint over the same."""
    from conftest import run_eval, run_training

    metrics = run_training(tmp_path / "run", [
        "model=gpt", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "data=divina", f"data.path={text_file}",
        "data.seq_len=16", "data.batch_size=4", "data.val_tokens=64", f"data.final_whole_split={final_whole_split}",
        "trainer.max_steps=2", "val_every=2", "logger=none", "num_samples=0"])
    dm = ready(TextDataModule(path=str(text_file), data_dir=tmp_path / "data", seq_len=16))
    whole = dm.evaluation_scope("val")["tokens"]
    assert metrics["val_whole_split"] is final_whole_split
    assert metrics["val_tokens"] == (whole if final_whole_split else 64)
    evaluated = run_eval([f"ckpt_path={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}"])
    assert evaluated["val_tokens"] == metrics["val_tokens"]
    assert evaluated["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)


def peak_memory_of_training(text: Path, data_dir: Path, run_dir: Path) -> int:
    """Train a tiny GPT on ``text`` for 2 updates in a child process; its peak RSS in bytes."""
    import subprocess
    import sys

    from conftest import REPO

    child = (
        "import resource, runpy, sys\n"
        "sys.argv = ['train.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as stop:\n"
        "    assert not stop.code, stop.code\n"
        "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child, "model=gpt", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
         "data=divina", f"data.path={text}", "data.seq_len=64", "data.batch_size=8", "data.val_tokens=100000",
         "trainer.max_steps=2", "val_every=2", "logger=none", "num_samples=0", f"paths.data_dir={data_dir}",
         f"paths.output_dir={run_dir}", "trainer.enable_progress_bar=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("peak")[-1])


@pytest.mark.slow
def test_training_on_a_large_text_reads_it_through_a_memory_map(tmp_path):
    """Hundreds of MB of text: the peak memory of a run (tokenising it, training, validating)
    grows by far less than the text's size over a run on a small text."""
    import random

    lines = [" ".join(random.Random(i).choices(["nel", "mezzo", "del", "cammin", "di", "nostra", "vita", "selva"],
                                                k=12)) for i in range(1000)]
    block = ("\n".join(lines) + "\n").encode()
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_bytes(block * 20)  # 1.4 MB
    with open(large, "wb") as f:
        for _ in range(300_000_000 // len(block)):  # 300 MB
            f.write(block)
    baseline = peak_memory_of_training(small, tmp_path / "data", tmp_path / "run-small")
    cold = peak_memory_of_training(large, tmp_path / "data", tmp_path / "run-large")
    warm = peak_memory_of_training(large, tmp_path / "data", tmp_path / "run-warm")  # the cached token file
    size = large.stat().st_size
    assert cold - baseline < size / 5 and warm - baseline < size / 5, (baseline, cold, warm, size)


def test_evaluation_windows_are_shared_between_ranks_each_target_once(text_file, tmp_path):
    from genlab.data.batches import FixedWindows

    dm = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, eval_batch_size=3))
    start, end = dm.ranges["val"]
    shards = [list(FixedWindows(dm.tokens, dm._window_starts("val"), 16, end, 3, replica=(r, 2))) for r in range(2)]
    assert len(shards[0]) == len(shards[1])  # every rank runs as many batches (each a collective call)
    in_order = torch.cat([shards[r][i][1].flatten() for i in range(len(shards[0])) for r in range(2)])
    expected = torch.from_numpy(dm.tokens[start + 1 : end].astype("int64"))
    assert torch.equal(in_order[in_order >= 0], expected)  # batch i of rank r is global batch 2i + r


def mapped_megabytes(path: Path) -> float:
    """How much of ``path`` is mapped into this process now (Linux: /proc/self/smaps)."""
    import re

    blocks = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text())
    return sum(int(re.search(r"\nRss:\s+(\d+)", b).group(1)) for b in blocks if b.split("\n")[0].endswith(str(path))) / 1024


def test_a_large_token_file_is_not_mapped_whole_by_random_windows(tmp_path, monkeypatch):
    from genlab.data import batches

    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 60, 16 << 20, dtype=np.uint16).tofile(path)  # 32 MB
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    stream = batches.WindowBatches(tokens[: 15 << 20], 64, 32)  # a view of the map, as a split is
    for budget, most in ((1 << 40, None), (1 << 20, 2.0)):  # mapped whole allowed; then past 1 MB
        monkeypatch.setattr(batches, "MAPPED_BYTES", budget)
        for position in range(300):
            x, y = stream.batch(position)
        assert torch.equal(x[:, 1:], y[:, :-1])  # windows read right after their pages were let go
        if most is None:
            assert mapped_megabytes(path) > 8  # 9,600 windows touch much of the file
        else:
            assert mapped_megabytes(path) < most
