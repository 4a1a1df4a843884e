"""The layer rule of DESIGN.md, read from the source: who may import whom.

faces (``cli``, ``demo``) > tasks (``segment``, ``align``) > ``engine`` > ``data``, ``models`` >
leaves (``config``, ``io``) > system leaves (``atomic``, ``headers``, ``lifecycle``: atomic
outputs, what an image file claims before decoding, process life) > ``errors``. A module imports only from its own package and from
layers below it; ``segment`` and ``align`` never import each other; there is no import cycle.
Every import counts: module level, inside functions, under ``if TYPE_CHECKING``, and module
names written as strings (``importlib.import_module("scarce.x")``, fork-server preloads). The
root ``scarce/__init__.py`` is the public API table: its lazy string references to every layer
are the one exception.

Run as a script (``python tests/test_layers.py``) it prints the import graph between packages.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

RANKS = {
    "errors": 0,
    "atomic": 0.5,
    "headers": 0.5,
    "lifecycle": 0.5,
    "config": 1,
    "io": 1,
    "data": 2,
    "models": 2,
    "engine": 3,
    "segment": 4,
    "align": 4,
    "faces": 5,
}
FACES = {"cli", "demo", "__main__", "napari"}


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``src/package``."""
    out = {}
    for file in sorted((src / package).rglob("*.py")):
        parts = list(file.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def group_of(module: str, package: str) -> str | None:
    """The layer group of a module: its first component below the package (faces merged)."""
    parts = module.split(".")
    if parts[0] != package:
        return None
    if len(parts) == 1:
        return "root"
    return "faces" if parts[1] in FACES else parts[1]


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, file: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``module`` imports, anywhere in its source."""
    tree = ast.parse(file.read_text(), filename=str(file))
    is_package = file.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # "scarce.data.store.Sample" -> "scarce.data.store"
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            for alias in node.names:
                full = f"{target}.{alias.name}"
                add(full if full in known else target)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in known
            and module.count(".") > 0  # the root's public API table is the exception
        ):
            add(node.value)
    return found


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module -> modules of the same package it imports."""
    files = module_files(src, package)
    known = set(files)
    return {m: imports_of(m, f, known) for m, f in files.items()}


def layer_violations(graph: dict[str, set[str]], package: str) -> list[str]:
    """Imports that break the layer rule, one line each."""
    problems = []
    for source, targets in sorted(graph.items()):
        g_source = group_of(source, package)
        for target in sorted(targets):
            g_target = group_of(target, package)
            if g_target in (g_source, "root") or g_source == "root":
                continue
            if g_source not in RANKS or g_target not in RANKS:
                problems.append(f"{source} -> {target}: {g_source or g_target} has no layer")
            elif RANKS[g_target] >= RANKS[g_source]:
                problems.append(
                    f"{source} -> {target}: {g_source} (layer {RANKS[g_source]}) may not import "
                    f"{g_target} (layer {RANKS[g_target]})"
                )
    return problems


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), as sorted lists."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def package_graph(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """The import graph between layer groups (for the report)."""
    out: dict[str, set[str]] = defaultdict(set)
    for source, targets in graph.items():
        for target in targets:
            a, b = group_of(source, package), group_of(target, package)
            if a != b:
                out[a].add(b)
    return dict(out)


# --------------------------------------------------------------------------- the real tree


def test_scarce_keeps_the_layer_rule():
    graph = import_graph(SRC, "scarce")
    assert len(graph) > 30
    problems = layer_violations(graph, "scarce")
    assert not problems, "\n".join(problems)


def test_scarce_has_no_import_cycle():
    cycles = find_cycles(import_graph(SRC, "scarce"))
    assert not cycles, cycles


def test_tasks_never_import_each_other():
    graph = import_graph(SRC, "scarce")
    crossing = [
        (s, t)
        for s, targets in graph.items()
        for t in targets
        if {group_of(s, "scarce"), group_of(t, "scarce")} == {"segment", "align"}
    ]
    assert not crossing


def test_no_module_is_over_450_lines():
    long = {
        str(f.relative_to(SRC)): n
        for f in (SRC / "scarce").rglob("*.py")
        if (n := len(f.read_text().splitlines())) > 450
    }
    assert not long, long


# ------------------------------------------------------------------ the checker, checked


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


GOOD = {
    "__init__.py": "",
    "errors.py": "",
    "config.py": "from pkg.errors import X\n",
    "data/__init__.py": "",
    "data/store.py": "from pkg import config\nfrom . import other\n",
    "data/other.py": "",
    "engine/__init__.py": "",
    "engine/trainer.py": "from pkg.data.store import open_env\n",
    "segment/__init__.py": "",
    "segment/task.py": "def f():\n    from pkg.engine.trainer import Trainer\n",
    "cli.py": "import pkg.segment.task\nfrom pkg import demo\n",
    "demo.py": "",
}


def test_checker_accepts_a_tree_that_keeps_the_rule(tmp_path):
    graph = import_graph(_tree(tmp_path, GOOD), "pkg")
    assert graph["pkg.engine.trainer"] == {"pkg.data.store"}
    assert graph["pkg.data.store"] == {"pkg.config", "pkg.data.other"}
    assert layer_violations(graph, "pkg") == [] and find_cycles(graph) == []


@pytest.mark.parametrize(
    ("file", "text", "expected"),
    [
        ("data/store.py", "from pkg.engine.trainer import Trainer\n", "data (layer 2)"),
        ("engine/trainer.py", "def f():\n    import pkg.segment.task\n", "engine (layer 3)"),
        ("data/other.py", "from ..models import x\n", "may not import models"),
        (
            "config.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.data import store\n",
            "config (layer 1)",
        ),
        ("data/other.py", 'PRELOAD = "pkg.segment.task"\n', "may not import segment"),
        ("segment/task.py", "from pkg.align.task import A\n", "segment (layer 4)"),
    ],
)
def test_checker_finds_an_upward_import(tmp_path, file, text, expected):
    files = {
        **GOOD,
        "models/__init__.py": "x = 1\n",
        "align/__init__.py": "",
        "align/task.py": "A = 1\n",
        file: text,
    }
    problems = layer_violations(import_graph(_tree(tmp_path, files), "pkg"), "pkg")
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_finds_a_cycle_inside_a_package(tmp_path):
    files = {
        **GOOD,
        "data/store.py": "from pkg.data import other\n",
        "data/other.py": "def f():\n    from pkg.data.store import g\n",
    }
    graph = import_graph(_tree(tmp_path, files), "pkg")
    assert layer_violations(graph, "pkg") == []
    assert find_cycles(graph) == [["pkg.data.other", "pkg.data.store"]]


if __name__ == "__main__":
    g = import_graph(SRC, "scarce")
    for source, targets in sorted(package_graph(g, "scarce").items()):
        print(f"{source:8s} -> {', '.join(sorted(targets))}")
    print(
        f"{len(g)} modules; layer violations: {len(layer_violations(g, 'scarce'))}; "
        f"cycles: {find_cycles(g)}"
    )
    sys.exit(0)
