"""The update loop has one owner: K (the updates one Lightning step makes) is known to the loop
(``genlab.loop.steps``) and the base models that make the updates, and to nothing else; and no part of
genlab imports one that sits above it."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src" / "genlab"
# the loop's internals: grouping batches by K, counting updates, the count itself
K_INTERNALS = {"UpdateGroup", "UpdateGroups", "GroupedTraining", "batches_of", "real_targets", "count_update",
               "updates_left", "AUTO_COUNT_VARIABLE",
               # and what they replaced, which data modules, callbacks and models once had to call
               "count_of", "use_count", "next_due_update", "updates_per_epoch", "lightning_steps", "unpack"}
K_OWNERS = {"genlab.loop.steps", "genlab.models.module", "genlab.models.base"}
def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(module imported from, names) for every ``from genlab... import`` and ``import genlab...``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in STORIES:  # from genlab.run import plan
            yield from ((f"{node.module}.{alias.name}", set()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genlab"):
            yield node.module, {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            yield from ((alias.name, set()) for alias in node.names if alias.name.startswith("genlab"))


# packages that group modules by the story they serve: folders to read, not layers; each module
# in them is a part of its own, as it was beside the others at genlab's top level
STORIES = {"genlab.run", "genlab.loop", "genlab.cli", "genlab.results"}


def part_of(module: str) -> str:
    """The part a module belongs to: its package (``genlab.models``, ``genlab.data``, ...) or itself."""
    parts = module.split(".")
    return ".".join(parts[:3] if ".".join(parts[:2]) in STORIES else parts[:2])


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        part = part_of(module_name(path))
        graph.setdefault(part, set()).update(part_of(source) for source, _ in imports(path)
                                             if source != "genlab" and part_of(source) != part)
    return graph


def test_only_the_loop_and_the_base_models_know_k():
    leaks = [f"{module_name(path)} imports {sorted(names & K_INTERNALS)} from {source}"
             for path in sorted(SRC.rglob("*.py")) if module_name(path) not in K_OWNERS
             for source, names in imports(path) if names & K_INTERNALS]
    assert not leaks, "\n".join(leaks)


def test_no_import_runs_up_the_layers():
    """The parts import each other without a cycle (a lazy import inside a function counts too):
    whatever a part imports sits below it, as ``genlab.models`` sits on ``genlab.loop.steps``."""
    graph, done, path = import_graph(), set(), []

    def cycle_from(part: str) -> list[str] | None:
        if part in path:
            return path[path.index(part):] + [part]
        if part in done:
            return None
        path.append(part)
        found = next((c for c in map(cycle_from, sorted(graph.get(part, ()))) if c), None)
        path.pop()
        done.add(part)
        return found

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, "an import runs upward: " + " -> ".join(cycles[0])
    assert "genlab.models" in graph["genlab.insight"] and "genlab.loop.steps" in graph["genlab.models"]  # the graph is read
