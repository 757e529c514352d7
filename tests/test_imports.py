"""The package's import graph has no cycle, and the layers import one way (front ends -> kernels -> rule).

Every module under ``src/ftmlopt`` is parsed with :mod:`ast` (nothing is imported). Every import
counts: at the top, inside functions, inside ``if TYPE_CHECKING:``. ``import a.b`` is an edge to
``a.b``; ``from a import b`` is an edge to ``a.b`` when that is a module and to ``a`` otherwise;
relative imports are resolved against the importing module's package. Edges to a package's
parents (which Python also runs) are not counted: every module would then "import" ``ftmlopt``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names(root: Path) -> dict[str, Path]:
    """``{dotted name: file}`` for every ``.py`` file of the packages under ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules it imports}``, restricted to the modules under ``root``."""
    names = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in names else base)
            graph[name].update(t for t in targets if t in names and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_sees_function_level_relative_and_type_checking_imports(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "",
        "pkg/a/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b.high import X\n",
        "pkg/b/__init__.py": "",
        "pkg/b/high.py": "def f():\n    from pkg.a import low\n",
        "pkg/c.py": "import pkg.a.low\nfrom . import b\n",
    })
    graph = import_graph(tmp_path)
    assert graph["pkg.a.low"] == {"pkg.b.high"}
    assert graph["pkg.b.high"] == {"pkg.a.low"}
    assert graph["pkg.c"] == {"pkg.a.low", "pkg.b"}
    assert find_cycle(graph) in (["pkg.a.low", "pkg.b.high", "pkg.a.low"], ["pkg.b.high", "pkg.a.low", "pkg.b.high"])
    _write(tmp_path, {"pkg/b/high.py": "import numpy\n"})
    assert find_cycle(import_graph(tmp_path)) is None


def test_ftmlopt_has_no_import_cycle() -> None:
    graph = import_graph(SRC)
    assert "ftmlopt.kernels.cpu" in graph and "ftmlopt.mxnet._kernel" in graph
    assert "ftmlopt.rule" in graph["ftmlopt.kernels.cpu"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("ftmlopt.rule", ("ftmlopt.",)),
        ("ftmlopt.kernels",
         ("ftmlopt.mxnet", "ftmlopt.torch", "ftmlopt.optax", "ftmlopt.keras", "ftmlopt.experiments")),
    ],
)
def test_layers_import_downwards_only(layer: str, forbidden: tuple[str, ...]) -> None:
    graph = import_graph(SRC)
    bad = sorted(
        (name, target)
        for name, targets in graph.items()
        if name == layer or name.startswith(layer + ".")
        for target in targets
        if target.startswith(forbidden) and target != "ftmlopt.rule"
    )
    assert not bad, bad


def test_the_numba_era_is_over() -> None:
    """Only the deprecated FTMLOPT_DISABLE_NUMBA alias may still say "numba" (the kernels are llvmlite's)."""
    src = Path(__file__).resolve().parents[1] / "src" / "ftmlopt"
    saying = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "numba" in p.read_text().lower())
    assert saying == ["mxnet/operator.py"], saying
