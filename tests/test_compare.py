"""compare.py on hand-made run folders: which keys count as swept, how values are shown, and a
figure and table that stay bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import image_file

from genlab.results.compare import SHOWN_PARAMETERS, compare, find_runs, plot, short, swept_parameters


def fake_run(folder: Path, model: str, data: str, lr: float, loss: float, **settings) -> None:
    (folder / ".hydra").mkdir(parents=True)
    config = {"data": {"_target_": f"genlab.data.{data}", "data_dir": str(folder), "batch_size": 32},
              "model": {"_target_": f"genlab.models.{model}", **settings},
              "optimizer": {"_target_": "torch.optim.AdamW", "lr": lr}, "seed": 42}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"model": model, "data": data, "optimizer": "adamw"}}}}))
    (folder / "metrics.json").write_text(json.dumps({"val_loss": loss, "best_val_loss": loss, "status": "completed"}))


def test_only_keys_that_really_differ_are_swept(tmp_path):
    for i, (lr, n_embd) in enumerate([(0.01, 10), (0.06184186727700784, 10), (0.1, 30)]):
        fake_run(tmp_path / f"mlp{i}", "mlp", "names", lr, 2.0 + i / 10, n_embd=n_embd, block_size=3)
    fake_run(tmp_path / "gpt", "gpt", "divina", 0.001, 1.9, n_embd=128, n_layer=4, n_head=4, dropout=0.1)
    runs = find_runs(tmp_path)
    # a GPT's n_layer is not swept against MLPs, nor is a class path or a data folder
    assert swept_parameters(runs) == ["data", "model", "model.n_embd", "optimizer.lr"]

    rows = compare(tmp_path)
    assert short(rows[2]["optimizer.lr"]) == "0.0618"
    axes = plot(runs, swept_parameters(runs), tmp_path / "figure.png")
    lr_panel = axes[swept_parameters(runs).index("optimizer.lr")]
    assert lr_panel.get_xscale() == "log"  # 0.001 .. 0.1: spread over decades


def test_the_table_and_figure_stay_bounded_with_many_swept_keys(tmp_path, capsys):
    for i in range(30):
        settings = {f"knob{k}": i * (k + 1) for k in range(20)}
        fake_run(tmp_path / f"run{i:02d}", "mlp", "names", 0.01 * (i + 1), 2.0 + i / 100, **settings)
    compare(tmp_path)
    printed = capsys.readouterr().out
    table = printed.split("\n\n")[0].splitlines()
    assert max(len(line) for line in table) <= 200
    assert f"the table shows the first {SHOWN_PARAMETERS}" in printed
    width, height = image_file(tmp_path / "comparison.png").size
    assert width <= 2600 and height <= 600


def results(folder: Path, **metrics) -> None:
    (folder / "metrics.json").write_text(json.dumps({"status": "completed", **metrics}))


def test_seed_replicates_are_one_row_with_mean_sd_and_count(tmp_path, capsys):
    losses = {0.01: [2.0, 2.1, 2.2], 0.1: [1.9, 2.0, 2.05]}
    for lr, per_seed in losses.items():
        for seed, loss in enumerate(per_seed):
            fake_run(tmp_path / f"lr{lr}-seed{seed}", "mlp", "names", lr, loss)
            config = yaml.safe_load((tmp_path / f"lr{lr}-seed{seed}" / ".hydra" / "config.yaml").read_text())
            (tmp_path / f"lr{lr}-seed{seed}" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**config, "seed": seed}))
    rows = compare(tmp_path)
    printed = capsys.readouterr().out
    table = printed.split("\n\n")[0].splitlines()
    assert len(table) == 3  # the header and one row a group, the lower mean first
    assert "1.9833 ± 0.0764 (3)" in table[1] and "0.1" in table[1] and "0,1,2" in table[1]
    assert "2.1000 ± 0.1000 (3)" in table[2]
    assert "6 runs in 2 groups of seed replicates" in printed
    assert len(rows) == 6 and {row["group"] for row in rows} == {0, 1}  # comparison.csv keeps every run
    with open(tmp_path / "comparison.csv") as f:
        assert len(f.read().splitlines()) == 7

    runs = find_runs(tmp_path)
    lr_panel = plot(runs, swept_parameters(runs), tmp_path / "figure.png")[0]
    bars = lr_panel.containers[0]  # one error bar a group: its mean, the sd as its half-length
    assert sorted(bars.lines[0].get_ydata()) == [pytest.approx(1.98333, abs=1e-4), pytest.approx(2.1)]
    segments = bars.lines[2][0].get_segments()
    assert sorted(round(s[1][1] - s[0][1], 4) for s in segments) == [round(2 * 0.0764, 4), 0.2]


def test_runs_on_different_tokenizers_are_ranked_by_bits_per_character(tmp_path, capsys):
    for name, tokenizer, loss, bpc in (("char", "char", 1.44, 2.08), ("bpe", "gpt2", 4.5, 1.95)):
        fake_run(tmp_path / name, "gpt", "divina", 1e-3, loss, n_layer=2)
        config = yaml.safe_load((tmp_path / name / ".hydra" / "config.yaml").read_text())
        config["data"]["tokenizer"] = tokenizer
        (tmp_path / name / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        results(tmp_path / name, val_loss=loss, val_bpc=bpc)
    rows = compare(tmp_path)
    assert "ranked by bits per character (the tokenizers differ)" in capsys.readouterr().out
    assert [row["run"] for row in rows] == ["bpe", "char"]  # lower bpc first, although its loss is higher
    assert rows[0]["val_bpc"] == 1.95


def test_image_runs_are_ranked_by_fid(tmp_path):
    for name, fid in (("a", 180.0), ("b", 95.5), ("c", 120.0)):
        fake_run(tmp_path / name, "dcgan", "celeba", 2e-4, 0.0, ngf=32 if name != "b" else 64)
        results(tmp_path / name, fid=fid, kid_mean=fid / 1000, images_per_second=50.0)
    rows = compare(tmp_path)
    assert [row["fid"] for row in rows] == [95.5, 120.0, 180.0]
