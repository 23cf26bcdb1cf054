"""Compare finished runs: every folder under a root that holds a ``metrics.json`` (a multirun
sweep, an Optuna study, single runs, or a mix). The swept parameters are the config values that
differ between the runs. Prints a table sorted by validation loss and writes ``comparison.csv``
and ``comparison.png`` (val loss against each swept parameter, and every run's val-loss curve)."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from genlab.errors import DataError
from genlab.figures import plt, save_figure
from genlab.runs import flatten

# run-specific values that differ between any two runs without being a choice anyone made
NOT_PARAMETERS = ("paths.", "hydra.", "ckpt_path")


@dataclass
class Run:
    folder: Path
    metrics: dict
    config: dict = field(default_factory=dict)

    @property
    def val_loss(self) -> float:
        value = self.metrics.get("val_loss")
        return math.inf if value is None else float(value)


def find_runs(root: Path) -> list[Run]:
    """Every run under ``root`` with a readable metrics.json; an unreadable one is skipped and named."""
    runs = []
    for metrics_file in sorted(root.rglob("metrics.json")):
        folder = metrics_file.parent
        try:
            metrics = json.loads(metrics_file.read_text())
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
            config_file = folder / ".hydra" / "config.yaml"
            config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False) if config_file.exists() else {}
        except Exception as err:  # cut short, hand-edited, not JSON or YAML: the other runs still compare
            print(f"skipped {folder}: its metrics.json or .hydra/config.yaml cannot be read "
                  f"({err.__class__.__name__}: {str(err)[:100]})", file=sys.stderr)
            continue
        runs.append(Run(folder, metrics, flatten(config)))
    return runs


def swept_parameters(runs: list[Run]) -> list[str]:
    """Config keys whose values are not the same in every run."""
    keys = sorted({k for run in runs for k in run.config if not k.startswith(NOT_PARAMETERS)})
    return [k for k in keys if len({json.dumps(run.config.get(k), sort_keys=True, default=str) for run in runs}) > 1]


def val_curve(folder: Path) -> tuple[list[int], list[float]]:
    """The run's logged ``loss/val`` against optimizer updates, from its TensorBoard events."""
    logs = folder / "tensorboard"
    if not logs.exists():
        return [], []
    # a run's event files are read in name order, not the order written: keep every event, sort
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0}, purge_orphaned_data=False).Reload()
    if "loss/val" not in events.Tags()["scalars"]:
        return [], []
    ordered = sorted(events.Scalars("loss/val"), key=lambda e: e.wall_time)
    points = {e.step: e.value for e in ordered}  # a step validated twice (a resumed run): the later value
    return sorted(points), [points[s] for s in sorted(points)]


def table_rows(runs: list[Run], params: list[str], root: Path) -> list[dict]:
    rows = []
    for run in sorted(runs, key=lambda r: r.val_loss):
        m = run.metrics
        rows.append({
            "run": str(run.folder.relative_to(root)) or ".",
            **{p: run.config.get(p) for p in params},
            "val_loss": m.get("val_loss"),
            "best_val_loss": m.get("best_val_loss"),
            "test_loss": m.get("test_loss"),
            "steps": m.get("steps"),
            "seconds": m.get("train_seconds"),
            "status": m.get("status", "completed"),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"
        return "-" if value is None else str(value)

    columns = list(rows[0])
    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def plot(runs: list[Run], params: list[str], path: Path) -> None:
    finished = [r for r in runs if r.metrics.get("status", "completed") == "completed" and r.val_loss < math.inf]
    panels = len(params) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    for ax, param in zip(axes[0], params):
        values = [r.config.get(param) for r in finished]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = values if numeric else [str(v) for v in values]
        ax.scatter(xs, [r.val_loss for r in finished])
        if numeric and values and min(values) > 0 and max(values) / min(values) >= 100:
            ax.set_xscale("log")
        ax.set(xlabel=param, ylabel="final val loss", title=f"val loss against {param}")
        ax.grid(alpha=0.3)
    curves = axes[0][-1]
    for run in runs:
        steps, losses = val_curve(run.folder)
        if steps:
            label = ", ".join(f"{p.split('.')[-1]}={run.config.get(p)}" for p in params) or run.folder.name
            curves.plot(steps, losses, marker=".", label=label)
    curves.set(xlabel="update", ylabel="val loss", title="validation loss of every run")
    if len(runs) <= 12:
        curves.legend(fontsize=7)
    curves.grid(alpha=0.3)
    save_figure(fig, path)


def compare(root: str | Path, out: str | Path | None = None) -> list[dict]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a sweep folder (outputs/multirun/...) or outputs/")
    runs = find_runs(root)
    if not runs:
        raise DataError(f"no finished run under {root} (no metrics.json); runs write one when they end")
    params = swept_parameters(runs)
    rows = table_rows(runs, params, root)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "comparison.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(runs, params, out / "comparison.png")
    print(format_table(rows))
    print(f"\n{len(rows)} runs; swept: {', '.join(params) or 'nothing'}; wrote {out / 'comparison.csv'} and "
          f"{out / 'comparison.png'}")
    return rows
