"""The package's shape, checked by reading its source with `ast` (nothing is imported):

* no import cycles between reid_batch modules (every import counts, at the top of a module or inside a function);
* stages are peers: no module of reid_batch.stages imports another stage;
* libraries never reach up: nothing below the stages imports a stage, the registry, the CLI or the runners;
* every stage of the registry has its module, and every stage module is in the registry;
* the registry, the CLI's module, the manifest, the layout, the results records and `report` load without torch;
* docs/architecture.md lists every module, and no module that is gone.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from reid_batch.registry import STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "reid_batch"
# Modules above the libraries: they may import stages (the CLI through the registry, bench to time stage steps).
TOP = {"reid_batch.cli", "reid_batch.__main__", "reid_batch.registry", "reid_batch.runner", "reid_batch.deploy",
       "reid_batch.bench"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The reid_batch modules `name` imports (a `from package import module` counts as the module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("reid_batch"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("reid_batch"):
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return {m for m in found if m != name and m != "reid_batch"}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    # Positive control: the check above could fail.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_stages_are_peers():
    graph = import_graph()
    offenders = sorted(f"{name} imports {other}" for name, imports in graph.items()
                       if name.startswith("reid_batch.stages.") for other in imports
                       if other.startswith("reid_batch.stages"))
    assert not offenders, offenders


def test_libraries_do_not_import_upwards():
    graph = import_graph()
    upper = TOP | {name for name in graph if name.startswith("reid_batch.stages")}
    offenders = sorted(f"{name} imports {other}" for name, imports in graph.items()
                       if name not in upper for other in imports if other in upper)
    assert not offenders, offenders


def test_registry_and_stage_modules_agree():
    registered = {f"reid_batch.stages.{stage.entry.split(':')[0]}" for stage in STAGES}
    present = {name for name in modules() if name.startswith("reid_batch.stages.")}
    assert registered == present
    for stage in STAGES:
        module, function = stage.entry.split(":")
        tree = ast.parse((PACKAGE / "stages" / f"{module}.py").read_text(encoding="utf-8"))
        assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, stage.entry


@pytest.mark.parametrize("module", ["reid_batch.cli", "reid_batch.registry", "reid_batch.layout",
                                    "reid_batch.manifest", "reid_batch.deploy", "reid_batch.stages.report",
                                    "reid_batch.results"])
def test_light_modules_load_without_torch(module):
    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"{module} imports torch"


def listed_in_code_map() -> set[str]:
    """The modules docs/architecture.md lists: every `reid_batch/....py` path in its text."""
    import re

    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    return set(re.findall(r"`(reid_batch/[\w/]+\.py)`", text))


def test_the_code_map_lists_every_module_and_nothing_that_is_gone():
    present = {str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    listed = listed_in_code_map()
    assert not present - listed, f"modules missing from docs/architecture.md: {sorted(present - listed)}"
    assert not listed - present, f"docs/architecture.md lists modules that are gone: {sorted(listed - present)}"
    # Positive control: the parser finds the rows, so an empty set cannot pass by accident.
    assert "reid_batch/results.py" in listed and len(listed) > 50


# Callables that take any number of positional arguments by design (a layer list).
VARIADIC = {"nn.Sequential", "torch.nn.Sequential"}


def long_positional_calls(source: str) -> list[tuple[int, str, int]]:
    """(line, callee, count) of every call passing more than six positional arguments."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            count = sum(1 for argument in node.args if not isinstance(argument, ast.Starred))
            if count > 6 and ast.unparse(node.func) not in VARIADIC:
                found.append((node.lineno, ast.unparse(node.func), count))
    return found


def test_no_call_passes_more_than_six_positional_arguments():
    """A reader cannot tell the seventh positional argument from the sixth: such calls take keywords."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}: {callee} with {count}"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 for line, callee, count in long_positional_calls(path.read_text(encoding="utf-8"))]
    assert not offenders, offenders
    # Positive control: the check sees a long call, and lets a variadic layer list through.
    assert long_positional_calls("f(1, 2, 3, 4, 5, 6, 7)") == [(1, "f", 7)]
    assert long_positional_calls("nn.Sequential(a, b, c, d, e, f, g)") == []
