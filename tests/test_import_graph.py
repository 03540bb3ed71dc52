"""No import cycles among our modules: the graph of flowar, heads, vae, train and eval, read from the source.

Every ``import`` / ``from ... import`` anywhere in a file counts (module level and inside functions: a
function-level import hides a cycle from the interpreter, not from the design). Edges go to the module
named: ``from .model import FlowAR`` in ``flowar/pipeline.py`` is pipeline -> flowar.model, and
``from . import fid`` is an edge to ``eval.fid``. Python runs a package's ``__init__`` before any of its
submodules, but counting that as an edge would make every package one cycle with its ``__init__``; only
naming the package itself (``import flowar``, ``from flowar import FlowAR``) is an edge to ``flowar``,
whose ``__init__`` in turn imports its submodules.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flowar", "heads", "vae", "train", "eval")


@dataclass(frozen=True)
class Edge:
    source: str  # dotted module name, e.g. "flowar.model"; a package's __init__ is the package name
    target: str
    where: str  # "flowar/model.py:12"


def module_names(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``packages`` under ``root``."""
    modules = {}
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = file
    return modules


def _known_prefix(name: str, modules) -> str | None:
    """The longest dotted prefix of ``name`` that is one of our modules (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, file: Path, modules) -> list[tuple[str, int]]:
    """(imported module, line) for each of our modules that ``module`` (at ``file``) imports."""
    is_package = file.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:  # ``import a.b`` names a.b (its parents' __init__ are not counted)
                target = _known_prefix(alias.name, modules)
                if target is not None:
                    found.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # The package a relative import starts from: the module's own package (itself, for an
                # __init__), then one package up per extra dot.
                package = module.split(".") if is_package else module.split(".")[:-1]
                up = node.level - 1
                if up > len(package) - 1:
                    raise ValueError(f"{file}:{node.lineno}: relative import beyond the top-level package")
                package = package[: len(package) - up]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            base_module = _known_prefix(base, modules)
            if base_module is None:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # ``from pkg import sub`` imports the submodule; ``from pkg import Name`` reads pkg's namespace.
                target = submodule if submodule in modules else base_module
                found.append((target, node.lineno))
    return sorted(set(found))  # one entry per statement and target: ``from .m import a, b`` is one import of m


def import_graph(root: Path = ROOT, packages=PACKAGES) -> tuple[dict[str, set[str]], list[Edge]]:
    """The adjacency sets over our modules, and every edge with where it comes from."""
    modules = module_names(root, packages)
    graph = {name: set() for name in modules}
    edges = []
    for name, file in modules.items():
        for target, line in imports_of(name, file, modules):
            graph[name].add(target)
            edges.append(Edge(name, target, f"{file.relative_to(root).as_posix()}:{line}"))
    return graph, edges


def strongly_connected_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit): every SCC, each a set of nodes."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The SCCs with more than one module, and modules that import themselves; sorted for stable output."""
    found = [c for c in strongly_connected_components(graph)
             if len(c) > 1 or next(iter(c)) in graph.get(next(iter(c)), ())]
    return sorted(found, key=lambda c: sorted(c))


def example_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One shortest closed path through the smallest-named module of ``component``, inside it."""
    start = min(component)
    previous = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node] & component):
            if succ == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if succ not in previous:
                previous[succ] = node
                queue.append(succ)
    raise AssertionError(f"{sorted(component)} is not a cycle")


def describe(graph, edges, found) -> str:
    lines = []
    for component in found:
        lines.append(f"cycle among {sorted(component)}: " + " -> ".join(example_cycle(graph, component)))
        for edge in sorted(edges, key=lambda e: (e.source, e.target, e.where)):
            if edge.source in component and edge.target in component:
                lines.append(f"    {edge.source} -> {edge.target}   ({edge.where})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the real graph
def test_our_packages_have_no_import_cycles():
    graph, edges = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + describe(graph, edges, found)


def test_the_graph_covers_every_package_and_sees_known_imports():
    graph, _ = import_graph()
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert on_disk == set(PACKAGES)
    assert {"flowar", "flowar.model", "heads", "vae.msvq", "train.train", "eval.sample"} <= set(graph)
    # flowar/__init__.py re-exports the model: an edge to the submodule, not a self-loop.
    assert "flowar.model" in graph["flowar"] and "flowar" not in graph["flowar"]


# ------------------------------------------------------------------------------------------- the detector
def test_cycle_finder_on_a_small_graph():
    graph = {
        "a": {"b"}, "b": {"c"}, "c": {"a", "d"},  # a 3-cycle with a tail
        "d": {"e"}, "e": set(),
        "f": {"f"},  # a self-loop
        "g": {"h"}, "h": {"g", "i"}, "i": {"h"},  # two 2-cycles sharing h: one SCC
        "j": {"a"},  # reaches a cycle but is not in one
    }
    assert cycles(graph) == [{"a", "b", "c"}, {"f"}, {"g", "h", "i"}]
    components = strongly_connected_components(graph)
    assert sorted(map(sorted, components)) == [["a", "b", "c"], ["d"], ["e"], ["f"], ["g", "h", "i"], ["j"]]
    assert example_cycle(graph, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert example_cycle(graph, {"f"}) == ["f", "f"]
    assert example_cycle(graph, {"g", "h", "i"}) == ["g", "h", "g"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []  # a DAG
    # A long chain closed at the end, deeper than Python's recursion limit.
    chain = {f"n{i:05d}": {f"n{i + 1:05d}"} for i in range(5000)}
    chain["n05000"] = {"n00000"}
    assert cycles(chain) == [set(chain)]


def write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_imports_resolve_to_modules_and_packages(tmp_path):
    write(tmp_path, {
        "pa/__init__.py": "from .core import Thing\nfrom .sub import deep\n",
        "pa/core.py": "import os\nfrom . import util\n\ndef late():\n    from .helpers import h\n",
        "pa/util.py": "from pa import Thing\n",  # names the package: an edge to pa/__init__.py
        "pa/helpers.py": "import pa.util\nfrom .core import late as _\n",
        "pa/sub/__init__.py": "from . import deep\nfrom ..util import x\n",
        "pa/sub/deep.py": "from .. import core\n",
        "pb/__init__.py": "",
        "pb/user.py": "from pa.core import Thing\nimport pb\nfrom pb import user\nimport numpy\n",
    })
    graph, edges = import_graph(tmp_path, ("pa", "pb"))
    assert graph == {
        "pa": {"pa.core", "pa.sub.deep"},
        "pa.core": {"pa.util", "pa.helpers"},
        "pa.util": {"pa"},
        "pa.helpers": {"pa.util", "pa.core"},
        "pa.sub": {"pa.sub.deep", "pa.util"},
        "pa.sub.deep": {"pa.core"},
        "pb": set(),
        "pb.user": {"pa.core", "pb", "pb.user"},
    }
    assert Edge("pa.core", "pa.helpers", "pa/core.py:5") in edges  # the function-level import, with its line
    found = cycles(graph)
    # pa -> core -> util -> pa, core <-> helpers, and sub.deep (pa -> sub.deep -> core); not pa.sub, which
    # nothing imports.
    assert found == [{"pa", "pa.core", "pa.helpers", "pa.sub.deep", "pa.util"}, {"pb.user"}]
    report = describe(graph, edges, found)
    assert "pa.util -> pa   (pa/util.py:1)" in report and "pb.user -> pb.user   (pb/user.py:3)" in report
    # Without the package-level import the package is acyclic: submodule imports do not go through __init__.
    write(tmp_path, {"pa/util.py": "import json\n", "pb/user.py": "from pa.core import Thing\n"})
    graph, _ = import_graph(tmp_path, ("pa", "pb"))
    assert graph["pa.util"] == set() and graph["pb.user"] == {"pa.core"}
    assert cycles(graph) == [{"pa.core", "pa.helpers"}]
