"""genlab's own code (src/) uses only the public, documented APIs of torch, Lightning and the other
libraries: a private name can change in any release and break the training loop.

The rule, checked on every .py file under src/ parsed with ``ast``:

- an attribute access ``base._name`` (one leading underscore, not a dunder such as ``__name__``)
  (or ``getattr``/``hasattr``/``setattr``/``delattr`` of it by a constant name) is private unless ``base`` is ``self`` or ``cls`` inside a class that genlab defines (its own
  attributes) or ``base`` is a name bound to a genlab module (``genlab.x._helper``);
- so is any dotted module path with a private part that starts with ``torch`` or ``lightning``
  (``import torch._dynamo``, ``from torch._inductor import config``, ``torch._C``).

``self`` inside a genlab class that subclasses a library's class could still reach the library's
private attributes (``self._trainer`` in a LightningModule): such a name is private too when the
library's base class defines it (checked against the private attributes that instances of
Lightning's ``LightningModule`` and ``Callback`` and torch's ``nn.Module`` and ``Optimizer`` have).

Not private: Hydra's config keys ``_target_``, ``_partial_`` (``_name_``: documented, underscores
both sides) and ``os._exit`` (documented). ``KNOWN`` lists the accesses that remain, none of torch
or Lightning: each patches a Hydra plugin's or submitit's internals that have no public hook."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
LIBRARIES = ("torch", "lightning")
DOCUMENTED = {"os._exit"}
KNOWN = {
    "OptunaSweeperImpl._configure_trials",  # genlab.sweeps: jobs numbered by their Optuna trial
    "SlurmInfoWatcher._make_command",  # genlab.sweeps: no sacct call where Slurm keeps no accounting
}



def private(name: str) -> bool:
    hydra_key = name.startswith("_") and name.endswith("_") and not name.startswith("__")
    return name.startswith("_") and not name.startswith("__") and not hydra_key


def library_private_attributes() -> set[str]:
    """The private attributes that the library classes genlab subclasses set on their instances."""
    module = L.LightningModule()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    names = set()
    for obj in (module, optimizer, L.Callback(), torch.nn.Module()):
        names |= {n for n in dir(obj) if private(n)}
    return names


def private_module_path(path: str | None) -> bool:
    parts = (path or "").split(".")
    return parts[0] in LIBRARIES and any(private(part) for part in parts)


def offenders(path: Path, inherited: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    genlab_names = set()  # names bound to genlab's own modules: their private helpers are ours
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if private_module_path(alias.name):
                    found.append(f"{path}:{node.lineno}: import {alias.name}")
                if alias.name.split(".")[0] == "genlab":
                    genlab_names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                if private_module_path(name):
                    found.append(f"{path}:{node.lineno}: from {name}")
            if (node.module or "").split(".")[0] == "genlab" or node.level:
                genlab_names.update(alias.asname or alias.name for alias in node.names)
    for base, attr, node in attribute_accesses(tree):
        if not private(attr):
            continue
        text = f"{ast.unparse(base)}.{attr}"
        if isinstance(base, ast.Name) and base.id in ("self", "cls"):
            if attr in inherited:  # a library base class's own private attribute
                found.append(f"{path}:{node.lineno}: {text}")
        elif not (isinstance(base, ast.Name) and base.id in genlab_names) and text not in DOCUMENTED | KNOWN:
            found.append(f"{path}:{node.lineno}: {text}")
    return found


def attribute_accesses(tree: ast.AST):
    """(base, attribute name, node) of every ``base.name`` and ``getattr(base, "name")`` (and
    hasattr, setattr, delattr)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.value, node.attr, node
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            yield node.args[0], node.args[1].value, node


def test_src_uses_no_private_attribute_of_torch_lightning_or_other_libraries():
    inherited = library_private_attributes()
    found = [line for path in sorted(SRC.rglob("*.py"))
             for line in offenders(path, inherited)]
    assert found == [], "private APIs used in src/:\n" + "\n".join(found)


def test_the_rule_finds_what_it_describes(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        "import torch._dynamo\n"
        "from torch._inductor import config\n"
        "from genlab.loop.steps import _helper\n"
        "class Model:\n"
        "    def f(self, optimizer):\n"
        "        self._mine, self.__class__\n"
        "        self._trainer\n"
        "        optimizer._opt_called = True\n"
        "        cfg.model._target_, os._exit, getattr(self, '_mine', None)\n"
        "        hasattr(optimizer.step, '_torchdynamo_orig_callable')\n"
        "        torch.optim.Optimizer.__init__\n")
    found = offenders(source, library_private_attributes())
    assert [line.split(": ", 1)[1] for line in found] == [
        "import torch._dynamo", "from torch._inductor.config", "self._trainer", "optimizer._opt_called",
        "optimizer.step._torchdynamo_orig_callable"]


def test_src_uses_no_experimental_or_check_dropping_compile_api():
    """Public names that still promise nothing: ``aot_compile`` (experimental), a compiled
    function's ``disable_guard_check`` and ``skip_all_guards_unsafe`` (every check dropped, so a
    graph runs for inputs it was not compiled for)."""
    names = ("aot_compile", "disable_guard_check", "skip_all_guards_unsafe", "mark_static_address")
    found = [f"{path.relative_to(SRC)}: {name}" for path in sorted(SRC.rglob("*.py"))
             for name in names if name in path.read_text()]
    assert found == []
