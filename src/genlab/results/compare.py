"""Compare finished runs: every folder under a root that holds a ``metrics.json`` (a multirun
sweep, an Optuna study, single runs, or a mix). The swept parameters are the config values that
really differ between the runs: the chosen model and data, and a model's or data's own setting only
between runs of that same model or data (a GPT's n_layer is not "swept" against an MLP).

Runs are ranked by the figure their kind has: language models by validation loss, or by bits per
character where their tokenizers differ (nats per token are not one scale then); image models by
FID. Runs that differ only in ``seed`` are replicates: the table then shows each group once, with
the mean, standard deviation and count of every figure, sorted by the mean. Writes
``comparison.csv`` (every run, every swept key, its replicate group) and ``comparison.png`` (the
ranking figure against each of the first swept parameters, with error bars over replicates, and
every run's validation curve); the printed table and the figure stay a readable size however many
runs and keys."""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.ticker import EngFormatter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from genlab.console import printable
from genlab.errors import DataError
from genlab.results.figures import plt, save_figure
from genlab.results.hparams import GROUPS, INTERNAL_KEYS
from genlab.run.plan import flatten
from genlab.run.trust import read_config, read_json

# run-specific values that differ between any two runs without being a choice anyone made, and the
# published figure a preset is compared with (notebook.*: a reference, not a setting)
NOT_PARAMETERS = ("paths.", "hydra.", "ckpt_path", "overwrite", "notebook.")
SHOWN_PARAMETERS = 4  # columns of the printed table and panels of the figure (comparison.csv has all)
SHOWN_CURVES = 12  # runs named in the curves' legend


@dataclass
class Run:
    folder: Path
    metrics: dict
    config: dict = field(default_factory=dict)

    @property
    def val_loss(self) -> float:
        return self.figure("val_loss")

    @property
    def is_image(self) -> bool:
        return "images_per_second" in self.metrics or "fid" in self.metrics

    def figure(self, name: str) -> float:
        """A figure of metrics.json; inf where the run has none (failed, another kind of model, not a number)."""
        value = self.metrics.get(name)  # metrics.json is read as data: a hand-edited text counts as none
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.inf


def find_runs(root: Path) -> list[Run]:
    """Every run under ``root`` with a readable metrics.json; an unreadable one is skipped and named."""
    runs = []
    for metrics_file in sorted(root.rglob("metrics.json")):
        folder = metrics_file.parent
        try:
            metrics = read_json(metrics_file)
            if metrics is None:
                raise ValueError("not a JSON object")
            config_file = folder / ".hydra" / "config.yaml"
            config = read_config(config_file) if config_file.exists() else {}
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
    chosen = ((read_config(record).get("hydra") or {}).get("runtime") or {}).get("choices")
    chosen = chosen if isinstance(chosen, dict) else {}
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


# metrics.json's figure -> its TensorBoard curve
CURVES = {"val_loss": "loss/val", "val_bpc": "loss/val_bpc", "fid": "quality/fid"}


def ranking_figure(runs: list[Run]) -> str:
    """What the language models among ``runs`` are ranked by: the validation loss, or bits per
    character where their tokenizers differ. Image models are ranked by FID whatever this says."""
    tokenizers = {run.config.get("data.tokenizer", "char") for run in runs if not run.is_image}
    return "val_bpc" if len(tokenizers) > 1 else "val_loss"


def rank_key(run: Run, figure: str) -> tuple[bool, float]:
    """Language models first, by ``figure``; then image models, by FID."""
    return (run.is_image, run.figure("fid" if run.is_image else figure))


def replicate_groups(runs: list[Run]) -> list[list[Run]]:
    """Runs that differ only in ``seed``: the same value of every other swept parameter."""
    others = [p for p in swept_parameters(runs) if p != "seed"]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps([run.config.get(p) for p in others], default=str), []).append(run)
    return list(groups.values())


def curves(folder: Path, tags) -> dict[str, tuple[list[int], list[float]]]:
    """The run's logged ``tags`` (validation loss, FID, ...) that it has, each against its steps,
    from its TensorBoard events."""
    logs = folder / "tensorboard"
    if not logs.exists():
        return {}
    # a run's event files are read in name order, not the order written: keep every event, sort
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0}, purge_orphaned_data=False).Reload()
    found = {}
    for tag in tags:
        if tag in events.Tags()["scalars"]:
            ordered = sorted(events.Scalars(tag), key=lambda e: e.wall_time)
            points = {e.step: e.value for e in ordered}  # a step validated twice (a resumed run): the later value
            found[tag] = (sorted(points), [points[s] for s in sorted(points)])
    return found


def val_curve(folder: Path, tag: str = "loss/val") -> tuple[list[int], list[float]]:
    """The run's logged ``tag`` against its steps (none: two empty lists)."""
    return curves(folder, [tag]).get(tag, ([], []))


# the figures a row shows, each where some run has it
FIGURES = ("val_loss", "best_val_loss", "test_loss", "val_bpc", "test_bpc", "fid", "kid_mean")


def table_rows(runs: list[Run], params: list[str], root: Path) -> list[dict]:
    """One row a run, ranked (``rank_key``), with its replicate group's number."""
    figure = ranking_figure(runs)
    group_of = {id(run): i for i, group in enumerate(replicate_groups(runs)) for run in group}
    figures = [f for f in FIGURES if any(f in run.metrics for run in runs)]
    rows = []
    for run in sorted(runs, key=lambda r: rank_key(r, figure)):
        m = run.metrics
        rows.append({
            "run": str(run.folder.relative_to(root)) or ".",
            **{p: run.config.get(p) for p in params},
            **{f: m.get(f) for f in figures},
            "group": group_of[id(run)],
            "steps": m.get("steps"),
            "seconds": m.get("train_seconds"),
            "status": m.get("status", "completed"),
        })
    return rows


def spread(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None for one value) and count of the finite ``values``."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None, None, 0
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None, len(finite)


def ranked_groups(runs: list[Run]) -> list[list[Run]]:
    """The replicate groups, language models first by the mean of the ranking figure, then image
    models by their mean FID."""
    figure = ranking_figure(runs)

    def key(group: list[Run]) -> tuple[bool, float]:
        image = group[0].is_image
        mean = spread([run.figure("fid" if image else figure) for run in group])[0]
        return image, math.inf if mean is None else mean
    return sorted(replicate_groups(runs), key=key)


def group_rows(runs: list[Run], params: list[str]) -> list[dict]:
    """One row a replicate group: its parameters (seed apart), the seeds, and each figure's mean ± sd
    over the group's completed runs; ranked (``ranked_groups``)."""
    figures = [f for f in FIGURES if any(f in run.metrics for run in runs)]
    rows = []
    for group in ranked_groups(runs):
        first = group[0]
        row = {"runs": len(group), **{p: first.config.get(p) for p in params if p != "seed"},
               "seeds": ",".join(str(run.config.get("seed")) for run in group)}
        for f in figures:
            row[f] = spread([run.figure(f) for run in group])
        rows.append(row)
    return rows


def mean_sd(value: tuple) -> str:
    """(mean, sd, count) as shown: 1.7622 ± 0.0081 (3)."""
    mean, sd, count = value
    if mean is None:
        return "-"
    digits = ".4f" if abs(mean) < 1000 else ".3g"
    return f"{mean:{digits}}" + (f" ± {sd:{digits}}" if sd is not None else "") + f" ({count})"


LOSSES = FIGURES


def format_table(rows: list[dict], params: list[str]) -> str:
    """The first SHOWN_PARAMETERS swept columns; figures to 4 decimals (a group's as mean ± sd
    (count)), the rest via ``short``."""
    def cell(column: str, value) -> str:
        if isinstance(value, tuple):
            return mean_sd(value)
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
    """The ranking figure against each shown parameter (a replicate group: its mean, with the
    standard deviation as error bar), and every run's validation curve of that figure."""
    params = [p for p in params if p != "seed"][:SHOWN_PARAMETERS]
    figure = "fid" if runs and all(r.is_image for r in runs) else ranking_figure(runs)
    shown = {"val_loss": "val loss", "val_bpc": "val bits per character", "fid": "FID"}[figure]
    completed = [r for r in runs if r.metrics.get("status", "completed") == "completed" and r.figure(figure) < math.inf]
    groups = replicate_groups(completed)
    panels = len(params) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    for ax, param in zip(axes[0], params):
        values = [g[0].config.get(param) for g in groups]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = values if numeric else [str(v) for v in values]
        stats = [spread([r.figure(figure) for r in g]) for g in groups]
        ax.errorbar(xs, [m for m, _, _ in stats], yerr=[sd or 0.0 for _, sd, _ in stats], fmt="o", capsize=4)
        if numeric and values and min(values) > 0 and max(values) / min(values) >= 10:  # spread over decades
            ax.set_xscale("log")
        ax.set(xlabel=param, ylabel=f"final {shown}", title=f"{shown} against {param}")
        ax.grid(alpha=0.3)
    curves = axes[0][-1]
    for run in runs:
        steps, losses = val_curve(run.folder, CURVES[figure])
        if steps:
            label = ", ".join(f"{p.split('.')[-1]}={short(run.config.get(p), 12)}" for p in params) or run.folder.name
            curves.plot(steps, losses, marker=".", label=label)
    curves.set(xlabel="update", ylabel=shown, title=f"{shown} of every run")
    curves.xaxis.set_major_formatter(EngFormatter(sep=""))  # 50k, 100k: long runs' labels do not overlap
    if 0 < len(curves.lines) <= SHOWN_CURVES:
        curves.legend(fontsize=7)
    curves.grid(alpha=0.3)
    save_figure(fig, path)
    return axes[0]


def runs_under(root: Path) -> list[Run]:
    """The finished runs under ``root`` (compare.py's and report.py's folder), or why there are none."""
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a sweep folder (outputs/multirun/...), outputs/reproduce/... "
                        "or outputs/")
    runs = find_runs(root)
    if not runs:
        raise DataError(f"no finished run under {root} (no metrics.json); runs write one when they end")
    return runs


def compare(root: str | Path, out: str | Path | None = None) -> list[dict]:
    root = Path(root)
    runs = runs_under(root)
    params = swept_parameters(runs)
    rows = table_rows(runs, params, root)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "comparison.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(runs, params, out / "comparison.png")
    groups = replicate_groups(runs)
    replicated = len(groups) < len(runs)
    shown_params = [p for p in params if p != "seed"] if replicated else params
    print(printable(format_table(group_rows(runs, params) if replicated else rows, shown_params)))  # names, tags: others' text
    more = f" (the table shows the first {SHOWN_PARAMETERS})" if len(shown_params) > SHOWN_PARAMETERS else ""
    ranked = [{"val_loss": "validation loss", "val_bpc": "bits per character (the tokenizers differ)"}[ranking_figure(runs)]
              ] if not all(r.is_image for r in runs) else []
    ranked += ["FID"] if any(r.is_image for r in runs) else []
    print(f"\n{len(rows)} runs" + (f" in {len(groups)} group{'s' * (len(groups) != 1)} of seed replicates (mean ± sd (count))" if replicated else "")
          + f"; ranked by {', then '.join(ranked)}"
          + f"; swept: {', '.join(params) or 'nothing'}{more}; wrote {out / 'comparison.csv'} and {out / 'comparison.png'}")
    return rows
