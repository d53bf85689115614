"""The shape of the code: no import cycles between fedsim modules, one caller of ``load_all``, small files.

The module graph is read from the sources with ``ast`` (nothing is imported), every ``import``
counted wherever it is written: at module level, inside functions and under ``TYPE_CHECKING``.
A function-level import still ties two modules together; it only hides the cycle from Python.
File paths map to dotted names through ``[tool.setuptools]`` in ``pyproject.toml`` (``strategies/``
is ``fedsim.strategies``, …). ``from fedsim.a import b`` is an edge to ``fedsim.a.b`` when that is
a module, else to ``fedsim.a``; a package's ``__init__.py`` is a node of its own (its dotted name),
and importing ``fedsim.a.b`` is not counted as importing the package ``fedsim.a``.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = ("fedsim", "strategies", "clients", "privacy")
MAX_LINES = 450
LOAD_ALL_HOME = "fedsim/catalog.py"


def package_dirs() -> dict[str, Path]:
    """Dotted package name -> its folder, from ``[tool.setuptools]`` of ``pyproject.toml``."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setup.get("package-dir", {})
    out = {}
    for package in setup["packages"]:
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):  # the longest mapped prefix: fedsim.data -> fedsim/ + data
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                out[package] = ROOT / mapping[prefix] / Path(*parts[cut:])
                break
        else:
            out[package] = ROOT / Path(*parts)
    return out


def product_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of every listed package."""
    modules = {}
    for package, folder in package_dirs().items():
        for file in sorted(folder.glob("*.py")):
            modules[package if file.name == "__init__.py" else f"{package}.{file.stem}"] = file
    return modules


def imported_modules(file: Path, name: str, known: set[str]) -> Iterator[tuple[str, int]]:
    """``(module, line)`` of every fedsim module that ``file`` (module ``name``) imports, anywhere in it."""

    def nearest(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "fedsim" or target.startswith("fedsim."):
                module = nearest(target)
                if module and module != name:
                    yield module, node.lineno


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[int]]]:
    """Edges ``module -> imported modules`` and the source lines of each edge."""
    modules = product_modules()
    known = set(modules)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    lines: dict[tuple[str, str], list[int]] = {}
    for name, file in modules.items():
        for target, line in imported_modules(file, name, known):
            edges[name].add(target)
            lines.setdefault((name, target), []).append(line)
    return edges, lines


def module_graph(edges: dict[str, set[str]]):
    import networkx as nx  # a dependency of torch

    graph = nx.DiGraph()
    graph.add_nodes_from(edges)
    graph.add_edges_from((a, b) for a, targets in edges.items() for b in targets)
    return graph


def import_cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], list[list[str]]]]:
    """Every group of mutually importing modules, with the shortest loop through each of its edges."""
    import networkx as nx

    graph = module_graph(edges)
    found = []
    for component in nx.strongly_connected_components(graph):
        if len(component) < 2:
            continue
        inner = graph.subgraph(component)
        loops = set()
        for a, b in inner.edges:
            loop = [a, *nx.shortest_path(inner, b, a)[:-1]]
            first = loop.index(min(loop))
            loops.add(tuple(loop[first:] + loop[:first]))
        found.append((sorted(component), sorted((list(loop) for loop in loops), key=lambda c: (len(c), c))))
    return sorted(found)


def describe_cycles(edges: dict[str, set[str]], lines: dict[tuple[str, str], list[int]]) -> str:
    modules = product_modules()
    report = []
    for component, loops in import_cycles(edges):
        report.append(f"cycle of {len(component)} modules: {', '.join(component)}")
        for loop in loops:
            report.append("  loop: " + " -> ".join([*loop, loop[0]]))
        report.append("  its edges (file:lines of the imports):")
        for a in component:
            for b in sorted(edges[a] & set(component)):
                where = ",".join(str(n) for n in sorted(set(lines[(a, b)])))
                report.append(f"    {a} -> {b}   {modules[a].relative_to(ROOT)}:{where}")
    return "\n".join(report)


def test_package_map_covers_the_product_folders():
    folders = {path.relative_to(ROOT).parts[0] for path in product_modules().values()}
    assert set(PRODUCT_DIRS) <= folders
    assert "fedsim.data.federation" in product_modules() and "fedsim.strategies.base" in product_modules()


def test_the_graph_reader_resolves_modules_names_and_function_level_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import fedsim.data.splits\nfrom fedsim.data import splits, DATASETS\n"
                      "def f():\n    from fedsim import errors\n    import numpy\n")
    known = {"fedsim", "fedsim.data", "fedsim.data.splits", "fedsim.errors"}
    assert sorted(imported_modules(source, "fedsim.mod", known)) == [
        ("fedsim.data", 2), ("fedsim.data.splits", 1), ("fedsim.data.splits", 2), ("fedsim.errors", 4)]
    assert import_cycles({"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}) == [
        (["a", "b", "c"], [["a", "b"], ["a", "b", "c"]])]


def test_no_import_cycles_between_fedsim_modules():
    edges, lines = import_graph()
    report = describe_cycles(edges, lines)
    print(report)
    assert not report, "import cycles (every import counts, also inside functions):\n" + report


def test_load_all_is_called_from_the_catalog_only():
    """A grep over the product sources: only the catalog may name ``load_all(``."""
    sites = [f"{file.relative_to(ROOT)}:{number}" for file in product_modules().values()
             for number, line in enumerate(file.read_text().splitlines(), 1) if "load_all(" in line]
    assert {site.rpartition(":")[0] for site in sites} == {LOAD_ALL_HOME}, (
        f"load_all() belongs to {LOAD_ALL_HOME} alone; found at: {', '.join(sites)}")


@pytest.mark.parametrize("folder", PRODUCT_DIRS)
def test_no_product_file_is_over_the_line_limit(folder):
    long = {str(path.relative_to(ROOT)): n for path in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by concern): {long}"
