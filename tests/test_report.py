"""scripts/report.py on a real tiny sweep (every run on the page, with the numbers of its
metrics.json; pictures that decode; nothing outside the page; what the runs wrote escaped), and
make reproduce's script end to end in quick mode."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import REPO
from PIL import Image

from genlab.loop.precision import cpu_name
from genlab.cli.reproduce import COURSE, QUICK, commands
from genlab.results.report import write_report

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY = ["model=mlp", "model.n_embd=4", "model.n_hidden=16", "data.batch_size=8", "trainer.max_steps=6",
        "val_every=3", "trainer.log_every_n_steps=2", "loop.updates_per_step=1", "num_samples=8",
        "trainer.enable_progress_bar=false", "callbacks.insight=null", "threads=1"]
PICTURE = re.compile(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two learning rates over two seeds: four runs of a tiny MLP on real names (the excerpt in
    tests/data, so that it needs neither the data mirror nor internet), six updates each."""
    tmp = tmp_path_factory.mktemp("report")
    folder = tmp / "sweep"
    done = subprocess.run([sys.executable, "train.py", "-m", *TINY, "optimizer.lr=0.01,0.1", "seed=0,1",
                           f"data.path={REPO / 'tests' / 'data' / 'names.txt'}",
                           f"hydra.sweep.dir={folder}", f"paths.data_dir={tmp / 'data'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


class Page(HTMLParser):
    """The tags of a page as a browser parses them, and every address their attributes hold."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: set[str] = set()
        self.addresses: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.addresses += [value or "" for name, value in attrs if name in ("src", "href", "action", "poster", "srcset")]


def self_contained(text: str) -> None:
    """Every address in the page is inside it (data: or #anchor), and nothing runs or is fetched."""
    page = Page(text)
    assert page.addresses and all(a.startswith(("data:", "#")) for a in page.addresses), [a[:40] for a in page.addresses]
    assert not page.tags & {"script", "link", "iframe", "object", "embed", "base"}, page.tags
    assert "url(" not in text and "@import" not in text


def runs_of(folder: Path) -> dict[Path, dict]:
    return {m.parent: json.loads(m.read_text()) for m in sorted(folder.rglob("metrics.json"))}


def pictures(page: str) -> list[Image.Image]:
    decoded = []
    for kind, data in PICTURE.findall(page):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()  # decodes every pixel: a cut or corrupt picture raises here
        assert image.format.lower() == kind
        decoded.append(image)
    return decoded


def test_the_report_of_a_sweep_shows_every_run_with_its_figures_and_nothing_outside_the_page(sweep):
    page_file = write_report(sweep)
    page = page_file.read_text(encoding="utf-8")
    runs = runs_of(sweep)
    assert len(runs) == 4
    for folder, metrics in runs.items():
        assert metrics["status"] == "completed"
        assert metrics["hardware"] == f"1 thread of {cpu_name()}"  # threads=1: what it trained on, in words
        assert html.escape(folder.name) in page
        assert page.count(html.escape(metrics["hardware"])) == 1  # every run's: said once, above the tables
        for figure in ("val_loss", "best_val_loss", "test_loss", "val_bpc"):
            assert f">{metrics[figure]:.4f}<" in page, figure  # the runs table: metrics.json's value
        data = json.loads(base64.b64decode(re.search(
            rf"{re.escape(html.escape(folder.name))}</td>.*?download=\"metrics.json\" href=\"data:application/json;base64,([^\"]+)\"",
            page, re.DOTALL).group(1)))
        assert data == metrics  # the page carries each run's metrics.json whole

    # the results table: one row a learning rate, its two seeds as mean ± sd (2), and its command
    for lr in ("0.01", "0.1"):
        group = [m for f, m in runs.items() if f"lr={lr}," in f.name]
        mean, sd = statistics.fmean(m["val_loss"] for m in group), statistics.stdev(m["val_loss"] for m in group)
        assert f"{mean:.4f} ± {sd:.4f} (2)" in page
        assert f"optimizer.lr={lr} seed=0,1" in html.unescape(page)
    assert "python train.py -m model=mlp" in page
    assert re.search(r'<tr class="swept"><th>optimizer.lr</th>', page) and re.search(r'<tr class="swept"><th>seed</th>', page)
    assert re.search(r'<tr class=""><th>model.n_hidden</th>', page)  # the same in every run: not marked

    # a curve picture for each learning rate, every picture decodable
    images = pictures(page)
    assert len(images) == 2 and all(image.width > 200 for image in images)

    # names with their novelty against the run's own training names
    first = min(runs)  # the first run of the lower learning rate's group shows its samples
    assert first.name.startswith("0-")
    names = (first / "samples.txt").read_text().split()
    known = set(torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)["genlab"]["training_words"])
    new = sum(name not in known for name in names)
    assert f"novelty {new}/{len(names)} = {100 * new / len(names):.0f}%" in page

    self_contained(page)
    assert page_file.stat().st_size < 3_000_000


def test_what_the_runs_wrote_is_shown_as_text_never_as_html(sweep, tmp_path):
    folder = tmp_path / "sweep"
    shutil.copytree(sweep, folder)
    run = next(folder.glob("0-*"))
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "status": "failed", "val_loss": "<b>1.0</b>",
                                                  "error": "<script>alert('metrics')</script>",
                                                  "hardware": "<img src=x onerror=alert(1)>"}))
    (run / "samples.txt").write_text('<iframe src="https://example.com"></iframe>\n')
    (next(folder.glob("1-*")) / "metrics.json").write_text("{not json")
    page = write_report(folder).read_text(encoding="utf-8")
    assert "<script" not in page and "<iframe" not in page and "<img src=x" not in page and "<b>1.0" not in page
    assert page.count("<th>hardware</th>") == 2  # the runs' hardware differs: a column in both tables
    assert "&lt;script&gt;alert(&#39;metrics&#39;)&lt;/script&gt;" in page and "&lt;iframe" in page
    self_contained(page)
    assert html.escape(run.name) in page and next(folder.glob("1-*")).name not in page  # the unreadable one skipped


def test_the_course_is_one_multirun_per_group_and_every_experiment_has_its_published_figure_in_its_preset():
    presets = [p for group in COURSE for p in group.presets]
    assert len(presets) == len(set(presets)) == 10
    conf = REPO / "conf" / "experiment"
    assert all((conf / f"{p}.yaml").exists() for p in presets)
    cpu = commands(Path("/r"), quick=True, gpu=False, passed=["hydra/launcher=parallel"])
    assert [name for name, _ in cpu] == ["seeds", "once"]
    seeds = dict(cpu)["seeds"]
    assert "seed=0,1,2" in seeds and "experiment=notebook_mlp,notebook_wavenet" in seeds
    assert "seed=0,1,2" not in dict(cpu)["once"]  # the seeds go to the MLP and the WaveNet only
    for _, args in cpu:
        assert args[:2] == ["train.py", "-m"] and args[-1].startswith("hydra.sweep.dir=/r/")
        assert set(QUICK) <= set(args) and "hydra/launcher=parallel" in args  # the user's launcher, every group
    assert [name for name, _ in commands(Path("/r"), quick=False, gpu=True, passed=[])] == ["seeds", "once", "gpu"]


@pytest.mark.slow
def test_make_reproduce_quick_runs_every_experiment_continues_and_a_failing_one_does_not_stop_the_others(tmp_path):
    folder = tmp_path / "reproduce"
    # the trigram's job folder already holds another run: that job is refused, the others run
    taken = folder / "once" / "1-experiment=notebook_trigram" / ".hydra"
    taken.mkdir(parents=True)
    (taken / "overrides.yaml").write_text("- experiment=notebook_trigram\n- seed=7\n")
    command = [sys.executable, "scripts/reproduce.py", "quick=true", f"dir={folder}", "gpu=false",
               f"paths.data_dir={tmp_path / 'data'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "1-experiment=notebook_trigram refused" in done.stderr
    runs = runs_of(folder)
    expected = [p for g in COURSE if not g.needs_gpu for p in g.presets if p != "notebook_trigram"]
    chosen = {f: (f / ".hydra" / "overrides.yaml").read_text() for f in runs}
    for preset in expected:
        mine = [f for f, text in chosen.items() if f"experiment={preset}\n" in text]
        assert len(mine) == (3 if preset in ("notebook_mlp", "notebook_wavenet") else 1), preset
        assert all(runs[f]["status"] == "completed" for f in mine)
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert all(f"experiment={p}" in page for p in expected) and pictures(page)
    assert "the course notebook&#39;s MLP" in page  # the preset's published figure, beside the row

    # run again: the finished jobs are kept as they are, and the report is written again
    kept = {f: (f / "metrics.json").stat().st_mtime_ns for f in runs}
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 1 and "1-experiment=notebook_trigram refused" in again.stderr
    assert {f: (f / "metrics.json").stat().st_mtime_ns for f in runs} == kept
