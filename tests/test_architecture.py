"""The package's import graph: no import circles, and imports run one way (front ends -> product -> engine).

Every import counts, function-local ones included (a local import that closes a circle is still a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "mlx_canary"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The command line and the HTTP server: nothing below them may import them.
FRONT_ENDS = {"cli", "server", "server_limits", "live", "listen", "__main__"}
# What turns the engine into a product: the pipeline, scheduling, loading/conversion/caching, output files.
PRODUCT = {"transcribe", "scheduler", "corpus", "corpus_ray", "evaluation", "loading", "cache", "hub", "convert",
           "salm_convert", "conversion", "model_dir", "nemo_archive", "quantize", "writers", "__init__"}
# Small modules every layer may use.
SHARED = {"errors", "options", "_version", "_blas", "audio", "transcript", "config"}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts
    return ".".join(parts) if parts != ("__init__",) else "__init__"


def imported_modules(path: Path, modules: set) -> set:
    """The package's modules that ``path`` imports (relative or absolute, anywhere in the file)."""
    name = module_name(path)
    package_parts = name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                prefix = node.module[len(PACKAGE) + 1:]
            else:
                continue
            # ``from . import audio`` imports the submodule audio; ``from .x import name`` the module x.
            targets = []
            for alias in node.names:
                candidate = f"{prefix}.{alias.name}" if prefix else alias.name
                targets.append(PACKAGE + "." + (candidate if candidate in modules else prefix or "__init__"))
        else:
            continue
        for target in targets:
            if target == PACKAGE:
                found.add("__init__")
            elif target.startswith(PACKAGE + "."):
                found.add(target[len(PACKAGE) + 1:] or "__init__")
    found.discard(name)
    return {m for m in found if m in modules}


def import_graph() -> dict:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def find_cycles(graph: dict) -> list:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layer(module: str) -> str:
    if module in FRONT_ENDS:
        return "front end"
    if module in PRODUCT:
        return "product"
    if module in SHARED:
        return "shared"
    return "engine"


def test_the_graph_is_read():
    graph = import_graph()
    assert {"cli", "server", "transcribe", "aed", "model"} <= set(graph)
    assert "aed" in graph["loading"] and "model" in graph["aed"]


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("lower, forbidden", [("engine", {"front end", "product"}), ("shared", {"front end", "product"}),
                                              ("product", {"front end"})])
def test_imports_run_one_way(lower, forbidden):
    graph = import_graph()
    wrong = sorted(f"{module} -> {target}" for module, targets in graph.items() if layer(module) == lower
                   for target in targets if layer(target) in forbidden)
    assert wrong == [], f"{lower} modules import upward: {', '.join(wrong)}"


def test_the_checks_catch_what_they_should():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert layer("cli") == "front end" and layer("conformer") == "engine" and layer("transcribe") == "product"
