"""Compare finished runs: every folder under a root that holds a ``metrics.json`` (a multirun
sweep, an Optuna study, single runs, or a mix). The swept parameters are the config values that
really differ between the runs: the chosen model and data, and a model's or data's own setting only
between runs of that same model or data (a GPT's n_layer is not "swept" against an MLP). Prints a
table sorted by validation loss and writes ``comparison.csv`` (every swept key) and
``comparison.png`` (val loss against each of the first swept parameters, and every run's val-loss
curve); the printed table and the figure stay a readable size however many runs and keys."""

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
from genlab.hparams import GROUPS, INTERNAL_KEYS
from genlab.runs import flatten

# run-specific values that differ between any two runs without being a choice anyone made
NOT_PARAMETERS = ("paths.", "hydra.", "ckpt_path", "overwrite")
SHOWN_PARAMETERS = 4  # columns of the printed table and panels of the figure (comparison.csv has all)
SHOWN_CURVES = 12  # runs named in the curves' legend


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
            config = {**flatten(config), **choices(folder)}
        except Exception as err:  # cut short, hand-edited, not JSON or YAML: the other runs still compare
            print(f"skipped {folder}: its metrics.json or .hydra/config.yaml cannot be read "
                  f"({err.__class__.__name__}: {str(err)[:100]})", file=sys.stderr)
            continue
        runs.append(Run(folder, metrics, config))
    return runs


def choices(folder: Path) -> dict:
    """The options the run chose for its config groups (model: gpt), from Hydra's record of it."""
    record = folder / ".hydra" / "hydra.yaml"
    if not record.exists():
        return {}
    chosen = OmegaConf.load(record).hydra.runtime.choices
    return {group: chosen[group] for group in GROUPS if chosen.get(group)}


def swept_parameters(runs: list[Run]) -> list[str]:
    """Config keys whose values really differ: a group's choice (model, data, ...) across all runs;
    a key inside a group (model.n_embd) only between runs that chose the same option of that group."""
    def differs(key: str, among: list[Run]) -> bool:
        return len({json.dumps(run.config.get(key), sort_keys=True, default=str) for run in among}) > 1

    keys = sorted({k for run in runs for k in run.config
                   if not k.startswith(NOT_PARAMETERS) and k.rsplit(".", 1)[-1] not in INTERNAL_KEYS})
    swept = []
    for key in keys:
        group = key.split(".", 1)[0]
        if "." not in key or group not in GROUPS:
            same_choice = [runs]
        else:
            by_choice = {}
            for run in runs:
                if key in run.config:
                    by_choice.setdefault(run.config.get(group), []).append(run)
            same_choice = list(by_choice.values())
        if any(differs(key, among) for among in same_choice):
            swept.append(key)
    # the groups' choices first, then their settings, then the run-wide ones (seed, val_every, ...)
    return sorted(swept, key=lambda k: (k not in GROUPS, "." not in k, k))


def short(value, width: int = 24) -> str:
    """A parameter value as shown: floats to 3 significant digits, long text cut."""
    text = f"{value:.3g}" if isinstance(value, float) else "-" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


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


LOSSES = ("val_loss", "best_val_loss", "test_loss")


def format_table(rows: list[dict], params: list[str]) -> str:
    """The first SHOWN_PARAMETERS swept columns; losses to 4 decimals, the rest via ``short``."""
    def cell(column: str, value) -> str:
        if column in LOSSES and isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"
        return short(value, width=40 if column == "run" else 24)

    hidden = set(params[SHOWN_PARAMETERS:])
    columns = [c for c in rows[0] if c not in hidden]
    cells = [[cell(c, row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def plot(runs: list[Run], params: list[str], path: Path):
    params = params[:SHOWN_PARAMETERS]
    finished = [r for r in runs if r.metrics.get("status", "completed") == "completed" and r.val_loss < math.inf]
    panels = len(params) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    for ax, param in zip(axes[0], params):
        values = [r.config.get(param) for r in finished]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = values if numeric else [str(v) for v in values]
        ax.scatter(xs, [r.val_loss for r in finished])
        if numeric and values and min(values) > 0 and max(values) / min(values) >= 10:  # spread over decades
            ax.set_xscale("log")
        ax.set(xlabel=param, ylabel="final val loss", title=f"val loss against {param}")
        ax.grid(alpha=0.3)
    curves = axes[0][-1]
    for run in runs:
        steps, losses = val_curve(run.folder)
        if steps:
            label = ", ".join(f"{p.split('.')[-1]}={short(run.config.get(p), 12)}" for p in params) or run.folder.name
            curves.plot(steps, losses, marker=".", label=label)
    curves.set(xlabel="update", ylabel="val loss", title="validation loss of every run")
    if 0 < len(curves.lines) <= SHOWN_CURVES:
        curves.legend(fontsize=7)
    curves.grid(alpha=0.3)
    save_figure(fig, path)
    return axes[0]


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
    print(format_table(rows, params))
    more = f" (the table shows the first {SHOWN_PARAMETERS})" if len(params) > SHOWN_PARAMETERS else ""
    print(f"\n{len(rows)} runs; swept: {', '.join(params) or 'nothing'}{more}; wrote {out / 'comparison.csv'} and "
          f"{out / 'comparison.png'}")
    return rows
