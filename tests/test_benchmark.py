"""scripts/benchmark.py: a row of docs/performance.md's table from one measurement."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchmark  # noqa: E402


def test_a_gpt_row_gives_both_sides_speed_and_share_of_one_matmul_peak(text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    figures = benchmark.measure(["model=shakespeare_gpt", "steps=4", "rounds=1", f"data.path={text_file}",
                                 f"paths.data_dir={tmp_path / 'data'}", "model.n_layer=1", "model.n_embd=32",
                                 "model.n_head=2"])
    row = benchmark.table_row("model=shakespeare_gpt", figures, benchmark.hardware(), "abc1234")
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    plain, genlab, ratio = cells[4], cells[5], cells[6]
    for side, cell in (("plain", plain), ("framework", genlab)):
        speed, flops, share = re.fullmatch(r"([\d,.]+) updates/s, ([\d.]+) GFLOP/s \((\d+)%\)", cell).groups()
        assert float(speed.replace(",", "")) == round(figures[side], 2 if figures[side] < 100 else 0)
        assert abs(float(flops) * 1e9 - figures[side + "_flops"]) < 0.1e9
        assert int(share) == round(100 * figures[side + "_flops"] / figures["peak_flops"])
    assert ratio.startswith(f"{figures['framework'] / figures['plain']:.3f} (")
    assert benchmark.matmul_flops() == figures["peak_flops"]  # one peak for every row of a table
