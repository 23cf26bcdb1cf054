"""A run folder or checkpoint from anyone is data (genlab.run.trust, docs/security.md): a corpus of
crafted ones, each refused with one message while a canary tree outside the test's folder stays
byte for byte the same. A new case is one line in CASES."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
import yaml
from conftest import compose_config, run_in_a_mount_namespace
from hydra import compose, initialize_config_dir
from PIL import Image

from genlab.run.checkpoints import AtomicCheckpointIO
from genlab.errors import CheckpointError, exit_on_user_error
from genlab.cli.evaluate import evaluate
from genlab.cli.sample import sample
from genlab.cli.train import CONF_DIR, train

TINY = ["model.n_hidden=16", "loop.updates_per_step=10", "num_samples=0", "logger=none", "callbacks.insight=null",
        "val_every=10"]
SYLLABLES = ["ma", "ri", "o", "lu", "ca", "gio", "van", "na", "an", "to", "el", "sa"]
NAMES = sorted({a + b + c for a in SYLLABLES for b in SYLLABLES for c in ("", "na", "to")})[:200]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One tiny trained run, copied by every case (training once keeps the module fast)."""
    base = tmp_path_factory.mktemp("pristine")
    (base / "names.txt").write_text("\n".join(NAMES) + "\n")
    run = base / "run"
    train(compose_config([f"data.path={base / 'names.txt'}", "trainer.max_steps=10", *TINY], run))
    return run


@pytest.fixture
def canary(tmp_path_factory) -> Path:
    """Files beside no run, in a temporary folder of their own: what a crafted run would reach."""
    folder = tmp_path_factory.mktemp("canary")
    (folder / "victim").mkdir()
    (folder / "victim" / "notes.txt").write_text("a student's notes\n")
    (folder / "victim" / "last.ckpt").write_bytes(b"not a checkpoint, but precious")
    (folder / "dotfile").write_text("export PATH=/usr/bin\n")
    return folder


def tree(folder: Path) -> dict[str, str]:
    """Every path under ``folder``: a file's hash, or what else it is (a folder, a link)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = f"link to {os.readlink(path)}"
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "folder"
    return found


# --- crafting --------------------------------------------------------------------------------------
def edit_config(edit: Callable[[dict, Path], None]):
    """A case that rewrites the run's recorded config (``edit(config, canary)``)."""
    def build(run: Path, canary: Path) -> None:
        path = run / ".hydra" / "config.yaml"
        config = yaml.safe_load(path.read_text())
        edit(config, canary)
        path.write_text(yaml.safe_dump(config))
    return build


def makedirs(canary: Path) -> dict:
    return {"_target_": "os.makedirs", "name": str(canary / "made-by-the-record")}


def callable_in(group: str):
    """``data.lowercase`` interpolated to a callable node kept in ``group`` (the issue's case: top level)."""
    def edit(config, canary):
        node = config if group == "top" else config.setdefault(group, {})
        node["pwn"] = makedirs(canary)
        config["data"]["lowercase"] = "${pwn}" if group == "top" else f"${{{group}.pwn}}"
    return edit_config(edit)


def data_setting(key: str, value):
    def edit(config, canary):
        config["data"][key] = value(canary) if callable(value) else value
    return edit_config(edit)


def edit_checkpoint(edit: Callable[[dict, Path, Path], None]):
    """A case that rewrites the run's last.ckpt (``edit(checkpoint, run, canary)``), as plain data."""
    def build(run: Path, canary: Path) -> None:
        path = run / "checkpoints" / "last.ckpt"
        checkpoint = torch.load(path, weights_only=True)
        edit(checkpoint, run, canary)
        torch.save(checkpoint, path)
    return build


def model_checkpoint_state(checkpoint: dict) -> dict:
    [key] = [k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint")]
    return checkpoint["callbacks"][key]


def outside_path(key: str):
    """ModelCheckpoint's ``key`` set to the canary's victim folder, reached from its recorded
    ``dirpath`` by ``..`` (which Lightning's textual parent check lets through)."""
    def edit(checkpoint, run, canary):
        state = model_checkpoint_state(checkpoint)
        old, state["dirpath"] = state["dirpath"], os.path.realpath(run / "checkpoints")  # where the run resumes
        for name in ("best_model_path", "last_model_path", "kth_best_model_path"):
            state[name] = state[name].replace(old, state["dirpath"])
        state["best_k_models"] = {p.replace(old, state["dirpath"]): v for p, v in state["best_k_models"].items()}
        victim = f"{state['dirpath']}/{os.path.relpath(os.path.realpath(canary), state['dirpath'])}/victim"
        state[key] = {victim: torch.tensor(0.0)} if key == "best_k_models" else victim
    return edit_checkpoint(edit)


def foreign_optimizer(checkpoint, run, canary):
    checkpoint["hyper_parameters"]["optimizer"] = {"_target_": "os.makedirs", "_partial_": True,
                                                   "name": str(canary / "made")}


def nested_target_in_hparams(checkpoint, run, canary):
    checkpoint["hyper_parameters"]["n_hidden"] = makedirs(canary)


def unknown_hyperparameter(checkpoint, run, canary):
    checkpoint["hyper_parameters"]["hook"] = "os.makedirs"


def unknown_entry(checkpoint, run, canary):
    checkpoint["hooks"] = {"on_load": "os.makedirs"}


def unknown_genlab_entry(checkpoint, run, canary):
    checkpoint["genlab"]["import"] = "planted"


def escape_vocabulary(checkpoint, run, canary):
    """Every letter of the vocabulary a control character: what is sampled is nothing else."""
    chars = checkpoint["hyper_parameters"]["tokenizer"]["chars"]
    controls = ("\x1b" + "".join(chr(c) for c in range(1, 27) if chr(c) != "\n"))[: len(chars) - 1]
    checkpoint["hyper_parameters"]["tokenizer"]["chars"] = chars[0] + controls


def unknown_tokenizer(checkpoint, run, canary):
    checkpoint["hyper_parameters"]["tokenizer"] = {"type": "sentencepiece", "file": str(canary / "dotfile")}


def link_to_canary(name: str):
    def build(run: Path, canary: Path) -> None:
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(canary / "dotfile")
    return build


class Case(NamedTuple):
    name: str
    build: Callable[[Path, Path], None]  # (the run's copy, the canary folder)
    command: str  # eval, sample or resume
    expected: str  # a fragment of the one error line (refused) or of the output (not refused)
    refused: bool = True


CASES = [
    *(Case(f"interpolation to a callable in {group}", callable_in(group), "eval", "names 'os.makedirs' to build")
      for group in ("top", "data", "model", "optimizer", "scheduler", "trainer", "callbacks", "logger")),
    Case("oc.create", data_setting("lowercase", "${oc.create:{_target_: os.makedirs, name: /tmp/x}}"), "eval",
         "is not a plain reference like ${paths.data_dir}"),
    Case("oc.env", data_setting("path", "${oc.env:HOME}/names.txt"), "eval", "'${oc.env:HOME}/names.txt' is not a plain"),
    Case("now", data_setting("path", "${now:%Y}"), "eval", "is not a plain reference"),
    Case("genlab's own resolver", data_setting("path", "${genlab_run_dir:a,b,c,d}"), "eval", "is not a plain reference"),
    Case("a reference inside a reference", data_setting("path", "${paths.${seed}}"), "eval", "is not a plain reference"),
    Case("a reference to itself", data_setting("path", "${data.path}"), "eval", "refers to itself"),
    Case("a nested _target_", data_setting("hook", makedirs), "eval", "data.hook names 'os.makedirs' to build"),
    Case("references that multiply", edit_config(lambda config, canary: config.update(
        data={**config["data"], "lowercase": ["${a}"] * 100}, a=["${b}"] * 100, b=["${seed}"] * 100)), "eval",
         "data resolves to more than 100,000 settings"),
    Case("a nested genlab _target_", data_setting("sampling", {"_target_": "genlab.data.names.NamesDataModule"}),
         "eval", "data.sampling names 'genlab.data.names.NamesDataModule' to build"),
    Case("a foreign data _target_", data_setting("_target_", "os.makedirs"), "eval",
         "data._target_ 'os.makedirs' is not one of genlab.data"),
    Case("Hydra's _args_", data_setting("_args_", lambda canary: [str(canary / "made")]), "eval",
         "data._args_ is a Hydra instruction"),
    Case("a setting the data module does not take", data_setting("name", "x"), "eval",
         "data.name is not a setting of genlab.data.names.NamesDataModule"),
    Case("a python tag in the YAML", lambda run, canary: (run / ".hydra" / "config.yaml").write_text(
        f"data: !!python/object/apply:os.makedirs ['{canary / 'made'}']\n"), "eval", "is not plain YAML"),
    *(Case(f"callback state: {key} outside the run ({command})", outside_path(key), command,
           f".{key} '", ) for key in ("last_model_path", "best_model_path", "kth_best_model_path", "best_k_models")
      for command in ("resume", "sample")),
    *(Case(f"a foreign optimizer target ({command})", edit_checkpoint(foreign_optimizer), command,
           "hyper_parameters.optimizer._target_ 'os.makedirs' is not one of torch's or genlab's optimizers")
      for command in ("resume", "sample", "eval")),
    Case("a nested _target_ in the hyper-parameters", edit_checkpoint(nested_target_in_hparams), "sample",
         "hyper_parameters.n_hidden names 'os.makedirs' to build"),
    Case("a hyper-parameter the model does not take", edit_checkpoint(unknown_hyperparameter), "eval",
         "hyper_parameters.hook is not a setting of genlab.models.mlp.MLP"),
    Case("an entry nobody writes", edit_checkpoint(unknown_entry), "resume",
         "its entry 'hooks' is not one that genlab or Lightning writes"),
    Case("an entry genlab does not write", edit_checkpoint(unknown_genlab_entry), "sample",
         "genlab.import is not an entry genlab writes"),
    Case("a tokenizer genlab does not know", edit_checkpoint(unknown_tokenizer), "sample",
         "hyper_parameters.tokenizer is not a vocabulary genlab writes"),
    Case("a symlinked lock file", link_to_canary(".lock"), "resume", ".lock is a symbolic link"),
    Case("a symlinked log file", link_to_canary("train.log"), "resume", "train.log is a symbolic link"),
    Case("escape sequences in a vocabulary", edit_checkpoint(escape_vocabulary), "sample", "\\x1b", refused=False),
]


def run_command(command: str, run: Path, work: Path) -> None:
    """The command a user sent this run types, in-process (each prints one line and exits 1 on a refusal)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        if command == "eval":
            evaluate(compose("eval", [f"ckpt_path={run}", f"paths.data_dir={work / 'data'}", "accelerator=cpu"]))
        elif command == "sample":
            sample(compose("sample", [f"ckpt_path={run}", "num_samples=20"]))
    if command == "resume":
        names = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["data"]["path"]
        train(compose_config([f"data.path={names}", "trainer.max_steps=30", *TINY, f"ckpt_path={run}"], run))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_crafted_run_is_refused_with_one_message_and_nothing_outside_changes(case, pristine, canary, tmp_path,
                                                                               capsys):
    run = tmp_path / "run"
    shutil.copytree(pristine, run, symlinks=True)
    case.build(run, canary)
    before = tree(canary)
    try:
        exit_on_user_error(run_command)(case.command, run, tmp_path)
        status = 0
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    assert tree(canary) == before
    assert not [c for c in out + err if ord(c) < 32 and c != "\n"], "a control character reached the terminal"
    if case.refused:
        assert status == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        assert case.expected in err, err
    else:
        assert status == 0 and case.expected in out, err


def test_the_belt_removes_checkpoint_files_only_inside_the_runs_folder(tmp_path, canary):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "old.ckpt").write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "outside.ckpt").symlink_to(canary / "dotfile")
    io, before = AtomicCheckpointIO(folder), tree(canary)
    io.remove_checkpoint(folder / "old.ckpt")
    assert not (folder / "old.ckpt").exists()
    for path in (f"{folder}/../../{os.path.relpath(canary, tmp_path)}/victim", folder / "sub", folder / "outside.ckpt",
                 canary / "dotfile"):
        with pytest.raises(CheckpointError, match="removes checkpoint files only inside"):
            io.remove_checkpoint(path)
    assert (folder / "sub").is_dir() and tree(canary) == before


def test_a_trusted_crafted_checkpoint_still_deletes_nothing_outside_the_run(pristine, canary, tmp_path):
    """trust_checkpoint=true skips the boundary, not the belt: Lightning's removal of the previous
    last.ckpt (the crafted path) goes through genlab's checkpoint files, which refuse it."""
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    outside_path("last_model_path")(run, canary)
    before = tree(canary)
    with pytest.raises(CheckpointError, match="removes checkpoint files only inside"):
        run_command_trusted(run)
    assert tree(canary) == before


def run_command_trusted(run: Path) -> None:
    names = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["data"]["path"]
    train(compose_config([f"data.path={names}", "trainer.max_steps=30", *TINY, f"ckpt_path={run}",
                          "trust_checkpoint=true"], run))


# --- a run folder shared read-only -----------------------------------------------------------------
@pytest.fixture
def read_only(request):
    """``read_only(folder)``: a read-only view of ``folder`` (a bind mount, which stops root as file
    modes do not; not root, the test runs in a mount namespace of its own, conftest.py)."""
    views = []
    if run_in_a_mount_namespace(request, "a read-only bind mount"):
        yield None
        return

    def mount(folder: Path) -> Path:
        view = folder.with_name(f"{folder.name}-read-only")
        view.mkdir()
        for command in (["mount", "--bind", str(folder), str(view)], ["mount", "-o", "remount,bind,ro", str(view)]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(command)} failed ({done.stderr.strip()})")
        views.append(view)
        return view

    yield mount
    for view in views:
        subprocess.run(["umount", "--lazy", str(view)], check=True)


def test_eval_and_sample_show_their_results_from_a_read_only_run_folder(pristine, read_only, tmp_path, capsys):
    run = read_only(pristine)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        result = evaluate(compose("eval", [f"ckpt_path={run}", f"paths.data_dir={tmp_path / 'data'}",
                                           "accelerator=cpu"]))
        out, err = capsys.readouterr()
        assert out.startswith(f"val {result['val_loss']:.4f}") and not (run / "eval.json").exists()
        assert err == (f"the result not saved: {run / 'eval.json'} cannot be written (Read-only file system); "
                       "pass out=FILE to save it elsewhere\n")
        chosen = tmp_path / "mine" / "eval.json"
        evaluate(compose("eval", [f"ckpt_path={run}", f"paths.data_dir={tmp_path / 'data'}", "accelerator=cpu",
                                  f"out={chosen}"]))
        assert json.loads(chosen.read_text())["val_loss"] == result["val_loss"]
        assert len(sample(compose("sample", [f"ckpt_path={run}", "num_samples=3"]))) == 3


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("gan")
    (base / "faces").mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(16):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(base / "faces" / f"{i:03d}.png")
    train(compose_config(["model=dcgan", "data=celeba", f"data.root={base / 'faces'}", "data.image_size=16",
                          "data.batch_size=8", "data.num_workers=0", "model.ngf=8", "model.ndf=8", "model.nz=12",
                          "model.grid_every=1", "model.grid_size=4", "val_every=1", "trainer.max_steps=1",
                          "data.val_fraction=0.25", "metrics.images=0", "logger=none"], base / "run"))
    return base / "run"


def test_sample_writes_images_into_the_checkpoints_run_folder_or_says_it_cannot(gan_run, read_only, tmp_path,
                                                                                capsys):
    lone = tmp_path / "downloads" / "gan.ckpt"  # a checkpoint on its own: its folder is its run's
    lone.parent.mkdir()
    shutil.copy(gan_run / "checkpoints" / "last.ckpt", lone)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert sample(compose("sample", [f"ckpt_path={lone}", "num_samples=4"])) == lone.parent / "samples.png"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads"]  # nothing in the grandparent
        run = read_only(gan_run)
        capsys.readouterr()
        sample(compose("sample", [f"ckpt_path={run}", "num_samples=4"]))
        out, err = capsys.readouterr()
        assert err == (f"the 4 images not saved: {run / 'samples.png'} cannot be written (Read-only file system); "
                       "pass out=FILE to save it elsewhere\n") and out == ""
        chosen = tmp_path / "grid.png"
        assert sample(compose("sample", [f"ckpt_path={run}", "num_samples=4", f"out={chosen}"])) == chosen
        assert chosen.stat().st_size > 0
