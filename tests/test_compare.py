"""compare.py on hand-made run folders: which keys count as swept, how values are shown, and a
figure and table that stay bounded."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import image_file

from genlab.compare import SHOWN_PARAMETERS, compare, find_runs, plot, short, swept_parameters


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
