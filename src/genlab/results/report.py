"""``scripts/report.py <folder>``: one self-contained HTML page from any set of runs.

The page holds the results table (one row a replicate group, as compare.py groups them: each
figure's mean ± sd over seeds, the published figure the preset names (``notebook:`` in
``conf/experiment/``), training time, hardware and the command that reproduces the row), the
training and validation curves from the runs' TensorBoard events, the samples (names with their
novelty, text continuations, the DCGAN's last grid and its FID/KID curve) and every run's settings,
the ones that differ between runs marked. Pictures are PNG or JPEG inlined as base64 and nothing
refers outside the page, so it opens from disk or an e-mail attachment.

Everything read from the run folders is untrusted: metrics.json through genlab's JSON reader
(``genlab.run.trust.read_json``, via compare.find_runs), the training names through the safe checkpoint
loader, pictures through Pillow with a size bound, and every string escaped by Jinja2's autoescape."""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
import shlex
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from genlab.run.checkpoints import read_checkpoint
from genlab.results.compare import (FIGURES, Run, curves, ranked_groups, ranking_figure, runs_under, short, spread,
                            swept_parameters)
from genlab.errors import GenlabError
from genlab.results.figures import plt
from genlab.run.outputs import atomic_write_text
from genlab.run.trust import read_json, read_overrides

# curves drawn for each kind of model: (tag, label) on the left axis, then the quality axis
LOSS_CURVES = (("loss/train", "train"), ("loss/val", "val"), ("loss/discriminator", "D"), ("loss/generator", "G"))
QUALITY_CURVES = (("quality/fid", "FID"), ("quality/kid", "KID"))
SHOWN_NAMES = 20
SHOWN_TEXT_CHARS = 1200  # of each continuation
MAX_IMAGE_SIDE = 4096  # a grid bigger than this is not a genlab grid: not decoded
GRID_SIDE = 400  # the inlined grid's width in pixels (a JPEG: a few tens of KB)
DPI = 72


# --- numbers and words -------------------------------------------------------------------------
def number(value) -> float | None:
    """A figure as read from metrics.json: a finite number, or None (missing, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def figure_text(value) -> str:
    value = number(value)
    return "-" if value is None else f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def mean_sd_text(values: list) -> str:
    mean, sd, count = spread([number(v) if number(v) is not None else math.inf for v in values])
    if mean is None:
        return "-"
    return figure_text(mean) + (f" ± {figure_text(sd)}" if sd is not None else "") + (f" ({count})" if count > 1 else "")


def seconds_text(values: list) -> str:
    values = [v for v in map(number, values) if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:,.1f} s" if high - low < 0.05 else f"{low:,.1f}-{high:,.1f} s"


def hardware(run: Run) -> str:
    recorded = run.metrics.get("hardware")
    if isinstance(recorded, str) and recorded:
        return recorded
    threads = number(run.metrics.get("threads"))
    return f"{run.config.get('trainer', '?')}" + (f", {threads:.0f} threads" if threads else "")


# --- what each run is, and the command that makes it again ---------------------------------------
def overrides(run: Run) -> list[str]:
    """The run's command-line overrides (a job that failed before it started has them in its metrics.json)."""
    recorded = read_overrides(run.folder / ".hydra" / "overrides.yaml")
    return recorded if recorded is not None else [str(o) for o in run.metrics.get("overrides") or []]


def command(group: list[Run]) -> str:
    """``python train.py`` with the group's overrides; values that differ between its runs (the
    seeds) become one multirun, ``seed=0,1,2``."""
    values: dict[str, list[str]] = {}
    for run in group:
        for override in overrides(run):
            key, _, value = override.partition("=")
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    args = [f"{key}={','.join(v)}" if v != [""] else key for key, v in values.items()]
    multirun = ["-m"] if any(len(v) > 1 for v in values.values()) else []
    return shlex.join(["python", "train.py", *multirun, *args])


def labels(groups: list[list[Run]], root: Path) -> list[str]:
    """Each group's name: its overrides that not every run shares (experiment=notebook_mlp, lr=0.01),
    seeds apart; else its folder."""
    per_group = [[o for o in overrides(g[0]) if not o.startswith("seed=")] for g in groups]
    shared = set.intersection(*map(set, per_group)) if len(per_group) > 1 else set()
    out = []
    for group, own in zip(groups, per_group):
        distinct = [o for o in own if o not in shared]
        out.append(" ".join(distinct) or " ".join(own) or str(group[0].folder.relative_to(root)) or group[0].folder.name)
    return out


def published(group: list[Run]) -> list[dict]:
    """The preset's published figures (``notebook: {val_loss: 1.848, source: ...}``), each with the
    group's mean of the same figure minus it (None where the runs have none)."""
    first = group[0]
    out = []
    for key, value in first.config.items():
        if key.startswith("notebook.") and key != "notebook.source" and number(value) is not None:
            figure = key.removeprefix("notebook.")
            mean = spread([run.figure(figure) for run in group])[0]
            out.append({"figure": figure, "value": number(value), "source": str(first.config.get("notebook.source") or ""),
                        "difference": None if mean is None else mean - number(value)})
    return out


# --- pictures ----------------------------------------------------------------------------------
def png_of(fig) -> str:
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(data.getvalue()).decode("ascii")


def curves_figure(group: list[Run], title: str) -> tuple[str | None, dict]:
    """The group's loss curves (and FID/KID on a second panel for an image model), one line a run;
    None where no run logged any. Also the curves themselves, for the page's data."""
    read = {run.folder: curves(run.folder, [t for t, _ in LOSS_CURVES + QUALITY_CURVES]) for run in group}
    if not any(read.values()):
        return None, {}
    quality = any(tag in found for found in read.values() for tag, _ in QUALITY_CURVES)
    fig, axes = plt.subplots(1, 2 if quality else 1, figsize=(9 if quality else 6, 3.2), squeeze=False)
    for i, run in enumerate(group):
        name = f"seed {run.config.get('seed')}" if len(group) > 1 else ""
        for panel, tags in ((axes[0][0], LOSS_CURVES), (axes[0][-1] if quality else None, QUALITY_CURVES)):
            for tag, label in tags:
                if panel is not None and tag in read[run.folder]:
                    steps, values = read[run.folder][tag]
                    panel.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1,
                               color=f"C{(LOSS_CURVES + QUALITY_CURVES).index((tag, label))}", alpha=1 - 0.25 * (i % 3),
                               label=f"{label} {name}".strip())
    axes[0][0].set(xlabel="update", ylabel="loss", title=title[:60])
    if quality:
        axes[0][-1].set(xlabel="update", ylabel="FID / KID", title="image quality")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.lines and len(ax.lines) <= 12:
            ax.legend(fontsize=7)
    data = {str(folder): {tag: {"steps": s, "values": v} for tag, (s, v) in found.items()} for folder, found in read.items()}
    return png_of(fig), data


def grid_picture(run: Run) -> str | None:
    """The newest image grid of an image run, as a small JPEG in base64 (None: none, or unreadable)."""
    grids = sorted((run.folder / "grids").glob("step_*.png"))
    path = grids[-1] if grids else run.folder / "samples.png"
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                return None
            image = image.convert("RGB")
            if image.width > GRID_SIDE:
                image = image.resize((GRID_SIDE, round(image.height * GRID_SIDE / image.width)))
            data = io.BytesIO()
            image.save(data, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return base64.b64encode(data.getvalue()).decode("ascii")


# --- samples -----------------------------------------------------------------------------------
def training_words(run: Run) -> set[str] | None:
    """The training names the run's checkpoint carries (None: no readable checkpoint)."""
    for name in ("last.ckpt", "best.ckpt"):
        path = run.folder / "checkpoints" / name
        if path.is_file():
            try:
                words = read_checkpoint(path).get("genlab", {}).get("training_words")
            except (GenlabError, OSError, AttributeError):
                continue
            return {w for w in words if isinstance(w, str)} if isinstance(words, list) else None
    return None


def samples(run: Run) -> dict | None:
    """What the run generated: names (with the share not in the training names), text, or a grid."""
    if run.is_image:
        picture = grid_picture(run)
        return {"kind": "images", "picture": picture} if picture else None
    try:
        text = (run.folder / "samples.txt").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if run.config.get("data") == "names":
        names = [line.strip() for line in text.splitlines() if line.strip()]
        known = training_words(run)
        new = None if known is None else sum(name not in known for name in names)
        return {"kind": "names", "names": names[:SHOWN_NAMES], "count": len(names), "new": new,
                "novelty": None if new is None or not names else new / len(names)}
    pieces = [p.strip()[:SHOWN_TEXT_CHARS] for p in text.split("\n\n---\n\n") if p.strip()]
    return {"kind": "text", "pieces": pieces[:3]}


# --- the page ----------------------------------------------------------------------------------
def data_uri(value, mime: str = "application/json") -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str)
    return f"data:{mime};base64,{base64.b64encode(text.encode('utf-8')).decode('ascii')}"


def settings_table(runs: list[Run], swept: list[str]) -> list[dict]:
    """One row a config key some run has (folders and Hydra's own record apart), each run's value in
    it; the swept keys (compare.swept_parameters: those that really differ) first, marked."""
    keys = sorted({k for run in runs for k in run.config if not k.startswith(("hydra.", "paths."))},
                  key=lambda k: (k not in swept, k))
    return [{"key": key, "swept": key in swept, "values": [short(run.config.get(key), 40) for run in runs]}
            for key in keys]


def report_context(root: Path, runs: list[Run]) -> dict:
    figure = ranking_figure(runs)
    swept = swept_parameters(runs)
    groups = ranked_groups(runs)
    names = labels(groups, root)
    rows, sections, all_curves = [], [], {}
    for label, group in zip(names, groups):
        first = group[0]
        main = "fid" if first.is_image else figure
        second = None if first.is_image else "test_bpc" if figure == "val_bpc" else "test_loss"
        completed = sum(run.metrics.get("status", "completed") == "completed" for run in group)
        rows.append({
            "label": label, "figure": main, "value": mean_sd_text([r.metrics.get(main) for r in group]),
            "second": second, "second_value": mean_sd_text([r.metrics.get(second) for r in group]) if second else "-",
            "published": published(group), "steps": sorted({str(r.metrics.get("steps", "-")) for r in group}),
            "time": seconds_text([r.metrics.get("train_seconds") for r in group]),
            "hardware": sorted({hardware(r) for r in group}), "runs": len(group), "completed": completed,
            "seeds": [str(r.config.get("seed")) for r in group] if len(group) > 1 else [],
            "command": command(group), "anchor": f"group-{len(rows)}"})
        picture, data = curves_figure(group, label)
        all_curves.update(data)
        sample_run, made = next(((r, s) for r in group if (s := samples(r))), (None, None))
        sections.append({"label": label, "anchor": rows[-1]["anchor"], "curves": picture, "samples": made,
                         "sample_run": str(sample_run.folder.relative_to(root)) if sample_run else None})
    runs = sorted(runs, key=lambda r: str(r.folder))
    run_rows = []
    for run in runs:
        run_rows.append({
            "name": str(run.folder.relative_to(root)) or ".", "status": str(run.metrics.get("status", "completed")),
            "error": str(run.metrics.get("error") or ""),
            "figures": {f: figure_text(run.metrics.get(f)) for f in FIGURES if f in run.metrics},
            "steps": str(run.metrics.get("steps", "-")), "time": seconds_text([run.metrics.get("train_seconds")]),
            "hardware": hardware(run), "metrics_uri": data_uri(run.metrics)})
    record = read_json(root / "reproduce.json") or {}
    machines = {hardware(run) for run in runs}
    return {
        "hardware": machines.pop() if len(machines) == 1 else None,  # the same for every run: said once
        "title": root.resolve().name, "root": str(root), "rows": rows, "sections": sections,
        "runs": run_rows, "figures_shown": [f for f in FIGURES if any(f in r.metrics for r in runs)],
        "swept": swept, "settings": settings_table(runs, swept),
        "record": {k: str(v) for k, v in record.items() if k != "groups" and v is not None},
        "groups_run": record.get("groups") if isinstance(record.get("groups"), dict) else {},
        "made": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "ranking": {"val_loss": "validation loss (nats per token)", "val_bpc": "validation bits per character"}[figure],
        "curves_uri": data_uri(all_curves),
    }


def render(root: Path, runs: list[Run]) -> str:
    env = Environment(loader=PackageLoader("genlab", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**report_context(root, runs))


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """The report of every run under ``root``, written to ``out`` (default ``<root>/report.html``)."""
    root = Path(root)
    runs = runs_under(root)
    page = Path(out) if out else root / "report.html"
    atomic_write_text(page, render(root, runs))
    return page
