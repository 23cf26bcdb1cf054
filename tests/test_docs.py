"""The documentation is checked against the software: in README.md and docs/*.md every command and
every ``key=value`` override (fenced blocks and inline code) composes as ``python train.py ... --cfg
job`` would, every script named answers ``--help``, every ``make`` target exists, every relative link
and ``#anchor`` resolves, every file the run-folder table lists is written by a tiny run, every error
message the troubleshooting page quotes is one that ``src/`` can print, and the README stays short.

An example that must not be checked (it shows an error on purpose, or needs a GPU) is marked with
its reason: ``<!-- not checked: the reason -->`` on the line before a fenced block or a line (or on
that line itself, e.g. in a table row), or ``# not checked: the reason`` at the end of a line in a
fenced block."""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from genlab.cli.train import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200
HOW_TO_SKIP = "if the example is not meant to work as written, put <!-- not checked: <why> --> on the line before it"
# [text](target) and ![alt](target); the target ends at a space (an optional title) or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
NOT_CHECKED = re.compile(r"(?:<!--|#)\s*not checked\s*:\s*(?P<why>[^>]*?)\s*(?:-->|$)")
FENCE = re.compile(r"^\s*(```|~~~)")
ENTRY_POINTS = {"train.py": "train", "sample.py": "sample", "eval.py": "eval"}
# a placeholder in an example: <run folder>, <date>, ...
PLACEHOLDER = re.compile(r"<[^<>\n]*>")
OVERRIDE = re.compile(r"^(?:\+\+|\+|~)?[a-z_][\w.@/]*=")


def rel(page: Path) -> str:
    return str(page.relative_to(REPO))


# --- reading a page: code as it appears, with line numbers and "not checked" marks ----------------

@dataclass
class Code:
    page: Path
    line: int
    text: str
    fenced: bool
    skipped: str | None  # the reason given, or None

    def where(self) -> str:
        return f"{rel(self.page)}:{self.line}"


def marked(line: str) -> str | None:
    found = NOT_CHECKED.search(line)
    if found and not found.group("why"):
        raise AssertionError(f"a 'not checked' mark without its reason: {line.strip()!r}")
    return found.group("why") if found else None


def code_of(page: Path) -> list[Code]:
    """Every fenced line (a ``\\``-continued command joined into one) and every inline code span."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, fence_skip, in_fence, prose = [], None, False, []
    for number, line in enumerate(lines, 1):
        before = lines[number - 2] if number > 1 else ""
        if FENCE.match(line):
            in_fence = not in_fence
            fence_skip = marked(before) if in_fence else None
            continue
        if in_fence:
            if found and found[-1].fenced and found[-1].text.endswith("\\") and found[-1].line < number:
                found[-1].text = found[-1].text[:-1].rstrip() + " " + " ".join(line.split())
                found[-1].skipped = found[-1].skipped or marked(line)
            else:
                found.append(Code(page, number, " ".join(line.split()), True, fence_skip or marked(line)))
        else:
            prose.append((number, line))
    # inline code: spans may wrap a line, never a paragraph
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (len(lines) + 1, "")]:
        if line.strip() and not line.startswith("    "):
            paragraph.append((number, line))
            continue
        text = "\n".join(l for _, l in paragraph)
        starts = [n for n, l in paragraph for _ in range(len(l) + 1)]
        for span in re.finditer(r"(`+)(.+?)\1", text, re.S):
            at = starts[span.start()]
            skip = marked(lines[at - 1]) or (marked(lines[at - 2]) if at > 1 else None)
            found.append(Code(page, at, " ".join(span.group(2).split()), False, skip))
        paragraph = []
    return found


# --- composing: Hydra's compose, as python train.py ... --cfg job --------------------------------

def groups() -> dict[str, list[str]]:
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in Path(CONF_DIR).iterdir() if d.is_dir()}


def is_group(key: str) -> bool:
    return "/" in key or (Path(CONF_DIR) / key).is_dir()


@functools.lru_cache(maxsize=None)
def composed(config: str, choices: tuple[str, ...]):
    """The config with these group options (a DictConfig), or Hydra's message. Composing costs a
    tenth of a second, so each choice of options is composed once and the keys an example sets
    are looked up in it, as compose would: a key must exist to be set, must not to be added (+)."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config, overrides=list(choices), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        return " ".join(str(err).split())


def key_problem(cfg, override) -> str | None:
    """What compose would say of ``override`` (a key's override) on ``cfg``, or None."""
    key, kind = override.key_or_group, override.type.name
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    exists = isinstance(node, DictConfig) and leaf in node.keys()
    if kind == "CHANGE" and not exists:
        return (f"Could not override '{key}': the composed config has no such key (a key the YAML lacks is added "
                f"with +{key}=...)")
    if kind == "ADD" and exists:
        return f"Could not append to config: an item is already at '{key}' (set it without +)"
    if kind == "DEL" and not exists:
        return f"Could not delete '{key}': the composed config has no such key"
    return None


def why_not(config: str, overrides: list[str]) -> str | None:
    """None if ``config`` composes with ``overrides`` (each option a sweep names; a sweep's values and
    Optuna's ranges need only parse), else what is wrong."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        return " ".join(str(err).split())
    choices: list[list[str]] = [[]]
    for override in parsed:
        if is_group(override.key_or_group):
            options = ([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]
                       if override.is_sweep_override() else [override.input_line])
            choices = [c + [o] for c in choices for o in options]
    for choice in choices:
        cfg = composed(config, tuple(choice))
        if isinstance(cfg, str):
            return cfg
        for override in parsed:
            if not is_group(override.key_or_group) and (problem := key_problem(cfg, override)):
                return problem
    return None


@functools.lru_cache(maxsize=None)
def has_key(group: str, option: str, key: str) -> bool:
    """Whether conf/<group>/<option>.yaml sets ``key`` (a cheap guess of where a key lives)."""
    node = OmegaConf.load(Path(CONF_DIR) / group / f"{option}.yaml")
    return OmegaConf.select(node, key, default=None) is not None or key.split(".")[0] in node


def why_not_anywhere(overrides: list[str]) -> str | None:
    """Overrides quoted alone in prose: they must compose with train.py's, sample.py's or eval.py's
    config as it is, or with one option of a group they name a key of (``model.counting=false`` is
    the bigram's), or with one preset or Optuna search; the options that set the key are tried first."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    likely, rest = [], []
    for group, options in groups().items():
        named = [k.split(".", 1)[1] for k in keys if k.startswith(group + ".")]
        if named or group in ("experiment", "hparams_search"):
            sets = [o for o in options if any(has_key(group, o, k) for k in named)]
            likely += [[f"{group}={o}"] for o in sets]
            rest += [[f"{group}={o}"] for o in options if o not in sets]
    if any(k.startswith("hydra.sweeper.") for k in keys):  # the Optuna searches set the sweeper
        likely += [[f"hparams_search={o}"] for o in groups()["hparams_search"]]
    first = None
    for choice in [[]] + likely + rest:
        for config in ENTRY_POINTS.values():
            error = why_not(config, choice + overrides)
            if error is None:
                return None
            first = first or error
    return first


# --- commands ---------------------------------------------------------------------------------------

def make_targets() -> dict[str, list[str]]:
    """Each Makefile target and its recipe lines."""
    targets, current = {}, None
    for line in (REPO / "Makefile").read_text().splitlines():
        if found := re.match(r"^([a-z][\w-]*):", line):
            current = targets.setdefault(found.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif not line.strip() or not line.startswith("\t"):
            current = None if not line.strip() or re.match(r"^\S", line) else current
    return targets


def words(text: str) -> list[str] | None:
    """The shell's words of a command line (placeholders and comments out), None if not a command."""
    text = PLACEHOLDER.sub("X", re.sub(r"^\$\s+", "", text))
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return None
    while tokens and re.match(r"^[A-Z][A-Z0-9_]*=", tokens[0]):  # VAR=value before the command
        tokens = tokens[1:]
    return tokens


def values(tokens: list[str]) -> list[str]:
    """The overrides among a command's words: flags, ``...`` and placeholder values left out."""
    return [t for t in tokens if OVERRIDE.match(t) and not t.endswith(("=", "=X", "=...")) and t != "..."]


@dataclass
class Command:
    code: Code
    program: str  # train.py, scripts/compare.py, make, ...
    args: list[str]


def command_of(code: Code) -> Command | None:
    tokens = words(code.text)
    if not tokens:
        return None
    if tokens[0] in ("python", "python3") and len(tokens) > 1 and tokens[1].endswith(".py"):
        return Command(code, tokens[1], tokens[2:])
    if tokens[0] == "torchrun":
        script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        return None if script is None else Command(code, tokens[script], tokens[script + 1:])
    if tokens[0] == "make" and len(tokens) > 1:
        return Command(code, "make", tokens[1:])
    return None


def problem(command: Command) -> str | None:
    """What is wrong with a command, or None."""
    program, args = command.program, command.args
    if program == "make":
        target = next((a for a in args if "=" not in a), None)
        recipe = make_targets().get(target)
        if recipe is None:
            return f"the Makefile has no target {target!r}"
        extra = next((a.split("=", 1)[1] for a in args if a.startswith("ARGS=")), "")
        for line in recipe:  # make T ARGS="..." runs the recipe's command with them
            if "$(ARGS)" in line and (inner := command_of(Code(command.code.page, command.code.line,
                                                                line.replace("$(PY)", "python").replace("$(ARGS)", extra),
                                                                True, None))):
                return problem(inner)
            if "$(ARGS)" in line and "-m pytest" in line:
                missing = [a for a in shlex.split(extra) if a.startswith("tests/") and not (REPO / a.split("::")[0]).exists()]
                return f"pytest is given {missing}, which do not exist" if missing else None
        return None
    if not (REPO / program).exists():
        return f"{program} does not exist"
    if program in ENTRY_POINTS:
        if any(a in ("--help", "-h", "--cfg", "-c", "--info") for a in args):
            return None if "--help" in args or "-h" in args else why_not(ENTRY_POINTS[program], values(args))
        return why_not(ENTRY_POINTS[program], values(args))
    if program.endswith(".py"):
        return script_help(program)
    return None


@functools.lru_cache(maxsize=None)
def script_help(script: str) -> str | None:
    """``python <script> --help`` exits 0 (run in this process: torch is imported already)."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as done:
        if done.code in (0, None):
            return None
        return f"`python {script} --help` exits {done.code}: {out.getvalue()[-500:]}"
    except Exception as err:
        return f"`python {script} --help` fails: {err!r}"
    finally:
        sys.argv = argv
    return f"`python {script} --help` does not stop after printing its help (it ran the script)"


def every_code() -> list[Code]:
    return [code for page in PAGES for code in code_of(page)]


def test_the_collector_reads_blocks_spans_and_marks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python train.py model=gpt` or `model.dropout=0.1\nmodel=gpt` here.\n\n"
        "<!-- not checked: needs a GPU -->\n```bash\npython train.py trainer=gpu \\\n    model=gpt\n```\n\n"
        "```\npython train.py model=nope  # not checked: shows the error\n$ python sample.py ckpt_path=<run>\n```\n"
        "| `sed=3` | a typo <!-- not checked: on purpose --> |\n", encoding="utf-8")
    found = [(c.line, c.text, c.fenced, c.skipped) for c in code_of(page)]
    assert found == [
        (6, "python train.py trainer=gpu model=gpt", True, "needs a GPU"),
        (11, "python train.py model=nope # not checked: shows the error", True, "shows the error"),
        (12, "$ python sample.py ckpt_path=<run>", True, None),
        (1, "python train.py model=gpt", False, None),
        (1, "model.dropout=0.1 model=gpt", False, None),
        (14, "sed=3", False, "on purpose"),
    ]
    commands = [command_of(Code(page, 1, text, True, None)) for _, text, _, _ in found]
    assert [(c.program, values(c.args)) if c else None for c in commands] == [
        ("train.py", ["trainer=gpu", "model=gpt"]), ("train.py", ["model=nope"]), ("sample.py", []), ("train.py", ["model=gpt"]),
        None, None]


def test_composing_catches_what_the_issue_found():
    assert why_not("train", ["model=lstm", "model.block_size=3"]) is not None  # not a key of the LSTM
    assert why_not("train", ["trainer.strategy=ddp"]) is not None  # a key the YAML lacks needs +
    assert why_not("train", ["+trainer.strategy=ddp"]) is None
    assert why_not("train", ["data.path=~/corpus/"]) is not None  # Hydra's grammar: ~ deletes a key
    assert why_not("train", ["optimizer.lr=0.01,0.1", "model=mlp,gpt", "model.n_embd=8"]) is None
    assert why_not("train", ["model=mlp,gpt", "model.n_layer=2"]) is not None  # the MLP has no layers
    assert why_not("train", ["model=nope"]) is not None
    assert why_not("train", ["+seed=1"]) is not None and why_not("train", ["~seed"]) is None
    assert why_not("train", ["optimizer.lr=0.01,0.1", "optimizer.lrr=1"]) is not None
    assert why_not_anywhere(["model.counting=false"]) is None  # the bigram's
    assert why_not_anywhere(["interpolate=true"]) is None  # sample.py's
    assert why_not_anywhere(["model.nope=1"]) is not None


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_command_and_override_composes(page):
    """Each example as a user would type it: the entry point's config composes with its overrides
    (each value of a sweep), a script answers --help, a make target exists and passes ARGS on."""
    wrong = []
    for code in code_of(page):
        if code.skipped:
            continue
        command = command_of(code)
        if command is not None:
            if (error := problem(command)) is not None:
                wrong.append(f"{code.where()}: `{code.text}`: {error}")
            continue
        tokens = words(code.text)
        if code.fenced or not tokens or not all(OVERRIDE.match(t) or t in ("-m", "...") for t in tokens):
            continue  # prose in backticks, not overrides
        overrides = values(tokens)
        if overrides and (error := why_not_anywhere(overrides)) is not None:
            wrong.append(f"{code.where()}: `{code.text}` composes with no config: {error}")
    assert not wrong, "\n".join([f"{len(wrong)} examples do not work as written ({HOW_TO_SKIP}):", *wrong])


# --- links and anchors -------------------------------------------------------------------------------

def relative_links(text: str) -> list[str]:
    """The link targets that name a file of the repository or an anchor (no URL)."""
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower-cased, punctuation out, spaces to hyphens,
    a repeated one numbered -1, -2, ...; and explicit ``id=``/``name=`` anchors."""
    seen: dict[str, int] = {}
    text = page.read_text(encoding="utf-8")
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence or not (heading := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen) | set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))


def test_anchors_follow_githubs_rules(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Comparing runs: one scale, and `seed` replicates\n## Tests\n## Tests\n```\n# not a heading\n```\n")
    assert anchors(page) == {"comparing-runs-one-scale-and-seed-replicates", "tests", "tests-1"}
    assert relative_links("[a](docs/a.md) ![b](b.png \"t\") [c](https://x.y) [d](#results) [e](mailto:x@y.z)") == [
        "docs/a.md", "b.png", "#results"]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_and_anchor_resolves(page):
    wrong = []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for target in relative_links(line):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                wrong.append(f"{rel(page)}:{number}: {target}: {path} does not exist")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                wrong.append(f"{rel(page)}:{number}: {target}: {file.relative_to(REPO)} has no heading with "
                             f"the anchor #{anchor} (its anchors: {', '.join(sorted(anchors(file)))})")
    assert not wrong, "\n".join(wrong)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.split("#")[0]).resolve() for t in relative_links((REPO / "README.md").read_text(encoding="utf-8"))}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_the_readme_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


# --- what a run writes -------------------------------------------------------------------------------

def run_folder_files() -> list[Code]:
    """The first-column code of every table whose header's first cell is "file": a run folder's files."""
    listed = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        in_table = False
        for number, line in enumerate(lines, 1):
            if re.match(r"^\|\s*file\s*\|", line, re.I):
                in_table = True
            elif in_table and line.startswith("|"):
                first = line.split("|")[1]
                skip = marked(line) or marked(lines[number - 2])
                listed += [Code(page, number, span, False, skip) for span in re.findall(r"`([^`]+)`", first)]
            else:
                in_table = False
    return listed


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A language model's run of 4 updates on the shipped names excerpt, and eval.py on it."""
    from conftest import run_eval, run_training

    run = tmp_path_factory.mktemp("docs") / "run"
    run_training(run, ["trainer.max_steps=4", "val_every=2", "loop.updates_per_step=1",
                       f"data.path={REPO / 'tests' / 'data' / 'names.txt'}"])
    run_eval([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    return run


def test_every_file_the_run_folder_table_lists_is_written(tiny_run):
    listed = [code for code in run_folder_files() if not code.skipped]
    assert listed, "no table with a 'file' column lists a run folder's files (docs/runs.md has one)"
    missing = [f"{c.where()}: `{c.text}`" for c in listed
               if not (list(tiny_run.glob(c.text.rstrip("/"))) and (not c.text.endswith("/") or (tiny_run / c.text).is_dir()))]
    written = sorted(str(p.relative_to(tiny_run)) for p in tiny_run.rglob("*") if p.is_file())
    assert not missing, "\n".join([f"files a page says a run writes, which a run of 4 updates and eval.py did not "
                                   f"write ({HOW_TO_SKIP}):", *missing, f"it wrote: {written}"])


# --- error messages ------------------------------------------------------------------------------------

MESSAGE_HOLE = re.compile(r"<[^<>]*>|\.\.\.|…|\bN\b")


def quoted_messages(page: Path) -> list[Code]:
    """What the troubleshooting page quotes as genlab's messages: lines starting ``error:`` in code
    blocks (with their continuation lines), and code of three words or more in a column whose header
    says "message"."""
    lines = page.read_text(encoding="utf-8").splitlines()
    quoted, message_column = [], None
    for number, line in enumerate(lines, 1):
        cells = [c.strip() for c in line.split("|")[1:-1]] if line.startswith("|") else None
        if cells and any("message" in c.lower() for c in cells) and not re.search(r"`", line):
            message_column = next(i for i, c in enumerate(cells) if "message" in c.lower())
        elif cells and message_column is not None and len(cells) > message_column:
            skip = marked(line) or marked(lines[number - 2])
            for span in re.findall(r"`([^`]+)`", cells[message_column]):
                if len(span.split()) >= 3:
                    quoted.append(Code(page, number, span, False, skip))
        elif not cells:
            message_column = None
    for code in code_of(page):
        if code.fenced or code.text.startswith("error:"):
            if code.text.startswith("error:"):
                text, following = code.text, code.line
                while following < len(lines) and lines[following].startswith("    ") and lines[following].strip():
                    text += " " + lines[following].strip()
                    following += 1
                quoted.append(Code(page, code.line, text, code.fenced, code.skipped))
    for number, line in enumerate(lines, 1):  # an indented code block's error line
        if line.startswith("    error:") and not any(q.line == number for q in quoted):
            text, following = line.strip(), number
            while following < len(lines) and lines[following].startswith("    ") and lines[following].strip():
                text += " " + lines[following].strip()
                following += 1
            quoted.append(Code(page, number, text, True, marked(lines[number - 2])))
    return quoted


ANY = "any"  # a hole that prints what a call returns, a list or an error's message
# the words a hole may print: a name, a number or a path one or two, a call's result or a list more
WORDS_PER_VALUE = {None: 2, ANY: 15}


def string_values(node: ast.AST, names: dict) -> list[list] | None:
    """The patterns a string expression can print: a literal, an f-string (its ``{name}`` holes
    filled with what the function assigned to ``name``, where that is a string too), ``a if c else b``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [[node.value]]
    if isinstance(node, ast.IfExp):
        body, orelse = string_values(node.body, names), string_values(node.orelse, names)
        return body + orelse if body and orelse else None
    if not isinstance(node, ast.JoinedStr):
        return None
    patterns = [[]]
    for value in node.values:
        if isinstance(value, ast.Constant):
            choices = [[value.value]]
        elif isinstance(value.value, ast.Name) and value.value.id in names:
            choices = names[value.value.id]
        else:
            text = ast.unparse(value.value)
            called = any(isinstance(n, ast.Call) for n in ast.walk(value.value))
            choices = [[ANY if called or re.search(r"\berr|error|reason|message", text) else None]]
        patterns = [p + c for p in patterns for c in choices][:16]
    return patterns


@functools.lru_cache(maxsize=1)
def source_strings() -> list[list[str | None]]:
    """Every string literal under src/ as a pattern: its text in pieces, a hole where an f-string's
    ``{...}`` goes (adjacent literals are one node to Python's parser, so a message is one pattern)."""
    patterns = []
    for file in sorted((REPO / "src").rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
            names: dict[str, list] = {}
            for node in ast.walk(scope):
                if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                        and (found := string_values(node.value, {}))):
                    names[node.targets[0].id] = found
            for node in ast.walk(scope):
                if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                                                       and " " in node.value):
                    patterns += string_values(node, names) or []
    return patterns


def glob_of(pieces: list[str | None]) -> list[str | None]:
    """Characters, and a hole (None or ANY) for each value, whitespace collapsed."""
    out: list[str | None] = []
    for piece in pieces:
        if piece in (None, ANY):
            out.append(piece)
        else:
            out.extend(re.sub(r"\s+", " ", piece))
    return out


VALUE = "value"  # a placeholder of the quote (<folder>, N): a value the source prints


def could_print(quote: str, pattern: list[str | None]) -> bool:
    """Whether some message that ``pattern`` prints contains ``quote``: two patterns with holes,
    matched against each other. In the quote, ``...`` elides any text and a placeholder (<folder>,
    N) stands for a value the source prints (or a word); a value the source prints stands for a few
    words of the quote (what a call returns, or an error's message, for more), so that the quote's
    other words are the source's."""
    pieces: list[str | None] = []
    at = 0
    for found in MESSAGE_HOLE.finditer(quote):
        pieces += [quote[at:found.start()], ANY if found.group() in ("...", "…") else VALUE]
        at = found.end()
    a = [ANY, *glob_of(pieces + [quote[at:]]), ANY]  # a quote is a part of the message
    b = glob_of(pattern)

    @functools.lru_cache(maxsize=None)
    def match(i: int, j: int, spaces: int) -> bool:  # spaces: what b's current hole has taken
        if i == len(a) or j == len(b):
            return all(x == ANY for x in a[i:]) and all(y in (None, ANY) for y in b[j:])
        if a[i] == ANY or (a[i] == VALUE and (b[j] in (None, ANY) or b[j] != " ")):
            # a placeholder takes the source's values and the letters of a word, never its spaces
            return match(i + 1, j, spaces) or match(i, j + 1, 0)
        if a[i] == VALUE:
            return match(i + 1, j, spaces)
        if b[j] in (None, ANY):
            if b[j] == ANY and i == 1 and j:  # a quote starts with the source's words or a value, not in a sentence
                return match(i, j + 1, 0)
            taken = spaces + (a[i] == " ")
            return match(i, j + 1, 0) or (taken < WORDS_PER_VALUE[b[j]] and match(i + 1, j, taken))
        return a[i] == b[j] and match(i + 1, j + 1, 0)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * (len(a) + len(b)) + 100))
    return match(0, 0, 0)


def printable(quote: str) -> bool:
    """Each sentence or clause of the quote (a message may join several of the source's strings)
    is printed by one string of src/."""
    quote = " ".join(re.sub(r"^error:\s*", "", quote).split())
    for parts in ([quote], re.split(r"(?<=\w{3}\.)\s+(?=[A-Z])|(?<=;)\s+", quote)):
        if all(any(could_print(part, pattern) for pattern in candidates(part)) for part in parts if part.strip()):
            return True
    return False


def candidates(clause: str) -> list[list[str | None]]:
    """The strings worth matching (a cheap test first): half the clause's words are theirs, or half of theirs the clause's."""
    def half(words: list[str], text: str) -> bool:
        return sum(w in text for w in words) * 2 >= len(words)

    words = lambda text: [w for w in re.split(r"\W+", text) if len(w) > 3]
    clause_words = words(MESSAGE_HOLE.sub(" ", clause))
    found = []
    for pattern in source_strings():
        literal = "".join(x for x in pattern if x not in (None, ANY))
        # a string of a word or two ("seed {value}") would match any clause that starts like it
        if half(clause_words, literal) or (len(words(literal)) >= 3 and half(words(literal), clause)):
            found.append(pattern)
    return found


def test_message_matching_reads_holes_on_both_sides():
    pattern = ["model=", None, " works on ", None, " data, but data=", None, " gives ", None, " data"]
    assert could_print("model=gpt works on text data, but data=celeba gives image data", pattern)
    assert could_print("works on <kind> data", pattern)
    assert not could_print("model=gpt works on text files, but data=celeba gives image data", pattern)
    assert not could_print("needs 3 MiB free beside the old one, and", ["needs ", None, ", and"])
    assert could_print("did you mean model.n_embd or model.n_head?", ["did you mean ", ANY, "?"])
    assert could_print("writing <file> needs <size> free", ["writing ", None, " needs ", ANY, " free, and"])
    assert not could_print("needs <size> free beside the old one, and <free> are free",
                           ["needs ", None, " free, and ", None, " are free"])


@pytest.mark.parametrize("page", [REPO / "docs" / "troubleshooting.md"], ids=rel)
def test_every_quoted_error_message_exists_in_the_source(page):
    quoted = [q for q in quoted_messages(page) if not q.skipped]
    assert len(quoted) >= 5, f"{rel(page)}: found only {len(quoted)} quoted messages; has the page's layout changed?"
    wrong = [f"{q.where()}: `{q.text}`" for q in quoted if not printable(q.text)]
    assert not wrong, "\n".join([f"messages {rel(page)} quotes that no string in src/ can print (<...>, N and ... "
                                 f"stand for any text; {HOW_TO_SKIP}):", *wrong])


def test_a_quoted_message_that_src_cannot_print_is_found():
    assert printable("error: seed must be a whole number (e.g. seed=42), got 'abc'")
    assert not printable("error: seed must be a round number (e.g. seed=42), got 'abc'")
