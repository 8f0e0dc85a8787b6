"""The package's shape: no import cycles, lower layers never reach up, every module says how to run it.

    python -m pytest -q tests/test_layout.py

Imports are read with ``ast`` from every module, those inside functions included: an import placed
in a function to dodge a cycle is still a cycle for a reader, who has to know both modules to change
either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python3_distillation"
NAME = PACKAGE.name

# The foundations: what they import must not depend on commands, serving or evaluation.
LOWER = ("config", "data", "models", "losses", "int8", "errors", "paths", "fsio", "tokenizer", "chunks",
         "checkpoint", "lineage", "device_plan", "resumable", "validation", "teacher_cache")
# Commands and front ends: each is a leaf its users call, never a library for the layers below.
UPPER = ("cli", "infer", "augment", "prune", "quantize", "experiments", "export", "serving",
         "evaluation", "distill_training", "distill_training_v2", "distill_infer", "distill_infer_v2",
         "distill_api_server", "distill_api_server_v2", "__main__")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (``from pkg import mod`` counts as mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES:
            targets = [node.value]  # a module imported by name when needed (importlib)
        else:
            continue
        for target in targets:
            # `import a.b.c` runs a, a.b and a.b.c: the deepest project module named is the edge.
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target != NAME:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _top(module: str) -> str:
    return module.removeprefix(NAME + ".").split(".")[0]


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The checker itself: a cycle hidden in a function body is found, a chain is not a cycle."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from python3_distillation import cli\n", encoding="utf-8")
    assert _imports(f"{NAME}.m", src) == {f"{NAME}.cli"}
    src.write_text('import importlib\nimportlib.import_module("python3_distillation.infer")\n', encoding="utf-8")
    assert _imports(f"{NAME}.m", src) == {f"{NAME}.infer"}


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _top(m) in LOWER))
def test_lower_layers_import_no_command_serving_or_evaluation(module):
    upward = sorted(m for m in GRAPH[module] if _top(m) in UPPER)
    assert upward == [], f"{module} imports {upward}"


def test_int8_kernel_module_imports_nothing_from_the_project():
    assert GRAPH[f"{NAME}.int8"] == set()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_docstring_opens_with_a_command(module):
    doc = ast.get_docstring(ast.parse(MODULES[module].read_text(encoding="utf-8")), clean=False)
    assert doc, f"{module} has no docstring"
    lines = doc.splitlines()
    # A command as the summary line itself, or (the usual form) a blank line then an indented command.
    commands = [line.strip() for line in lines[1:4] if line.startswith("    ")]
    if lines[0].startswith(("python ", "make ", "gpt2-distill ")):
        commands.insert(0, lines[0])
    assert commands, f"{module}'s docstring does not open with a command:\n{doc[:300]}"
