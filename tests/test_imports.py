"""The package's own import graph: no cycle, no stage importing another stage, no pointless lazy import.

Every module of `pipeline` (subpackages too) is parsed with `ast`, not imported, and each import of a
`pipeline` module becomes an edge, wherever it stands: at module level or inside a function. Counting the
function-local imports is what makes "no local import used to dodge a cycle" checkable: a lazy import
kept for start-up speed (torch only in the function that needs it) is fine as long as hoisting it would
create no cycle. Imports under `if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pipeline"

# The stages: the modules a workflow script (workflow/scripts/*.py, run by the rules in workflow/rules/*.smk)
# calls as a stage (`from pipeline import <stage>`; `test_stages_are_what_the_scripts_call` keeps this in step).
# Everything else (config, specs, schemas, models, templates, probes, refusal, stats, figures, ...) is a shared
# piece that stages may import.
STAGES = frozenset(f"{PACKAGE}.{s}" for s in (
    "prompts", "activations", "directions", "select", "sweep", "generate", "score", "aggregate", "length",
    "stability", "export", "optimize"))

# Edges (importer, imported) the checks below tolerate: none. An entry must name an import that exists.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    local: bool  # inside a function (runs when called), not at module level

    def __str__(self) -> str:
        where = "inside a function" if self.local else "at module level"
        return f"{self.importer} -> {self.imported} (line {self.line}, {where})"


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` (a folder under `root`), subpackages too."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The module that `name` (a module, or a name inside one) belongs to, if it is one of `known`."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, known: dict[str, Path], package: str) -> list[Edge]:
    """The edges from module `name` to the other modules of `known`, relative imports resolved."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]  # the package that `from . import` means
    edges: list[Edge] = []

    def add(target: str, node: ast.stmt, local: bool) -> None:
        owner = _owner(target, known)
        if owner is not None and owner != name and target.split(".")[0] == package:
            edges.append(Edge(name, owner, node.lineno, local))

    def visit(nodes: list[ast.stmt], local: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node, local)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                for alias in node.names:
                    # `from pkg import mod` imports the module; `from mod import func`, the module it is in
                    sub = f"{base_name}.{alias.name}"
                    add(sub if sub in known else base_name, node, local)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse, local)  # the body never runs
                continue
            inner = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                block = getattr(node, field, None)
                if isinstance(block, list) and block and isinstance(block[0], (ast.stmt, ast.excepthandler,
                                                                                 ast.match_case)):
                    for child in block:
                        if isinstance(child, (ast.excepthandler, ast.match_case)):
                            visit(child.body, inner)
                        else:
                            visit([child], inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)).body, False)
    return edges


def import_graph(root: Path, package: str) -> dict[str, list[Edge]]:
    known = modules(root, package)
    return {name: imports_of(name, path, known, package) for name, path in known.items()}


def find_cycle(graph: dict[str, list[Edge]]) -> list[Edge] | None:
    """One import cycle as its edges, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[Edge] = []

    def dfs(node: str) -> list[Edge] | None:
        state[node] = 1
        for edge in graph.get(node, []):
            if state.get(edge.imported) == 1:
                start = next((i for i, e in enumerate(path) if e.importer == edge.imported), len(path))
                return path[start:] + [edge]
            if edge.imported not in state:
                path.append(edge)
                found = dfs(edge.imported)
                if found:
                    return found
                path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def loaded_at_import(graph: dict[str, list[Edge]], name: str) -> set[str]:
    """The modules importing `name` loads: its module-level imports, transitively."""
    seen, todo = {name}, [name]
    while todo:
        for edge in graph.get(todo.pop(), []):
            if not edge.local and edge.imported not in seen:
                seen.add(edge.imported)
                todo.append(edge.imported)
    return seen


def pointless_lazy_imports(graph: dict[str, list[Edge]]) -> list[Edge]:
    """Function-local imports of a module that the file's module-level imports load anyway: they save no
    start-up time, so they are either left over or hide something."""
    return [e for name, edges in graph.items() for e in edges
            if e.local and e.imported in loaded_at_import(graph, name)]


def _without_known(graph: dict[str, list[Edge]]) -> dict[str, list[Edge]]:
    return {name: [e for e in edges if (e.importer, e.imported) not in KNOWN_VIOLATIONS]
            for name, edges in graph.items()}


def _lines(edges) -> str:
    return "\n  ".join(str(e) for e in edges)


# --------------------------------------------------------------------------- the package


def test_no_import_cycle():
    cycle = find_cycle(_without_known(import_graph(ROOT, PACKAGE)))
    assert cycle is None, "import cycle (function-local imports count):\n  " + _lines(cycle)


def test_no_stage_imports_another_stage():
    bad = [e for edges in _without_known(import_graph(ROOT, PACKAGE)).values() for e in edges
           if e.importer in STAGES and e.imported in STAGES]
    assert not bad, ("a stage imports another stage; move what they share to a shared module:\n  "
                     + _lines(bad))


def test_no_pointless_lazy_import():
    bad = pointless_lazy_imports(_without_known(import_graph(ROOT, PACKAGE)))
    assert not bad, "function-local imports of modules the file already loads at import; hoist them:\n  " + _lines(bad)


def test_known_violations_are_still_there():
    """An entry of KNOWN_VIOLATIONS whose import is gone goes too, so the list cannot hide a new one."""
    edges = {(e.importer, e.imported) for es in import_graph(ROOT, PACKAGE).values() for e in es}
    assert KNOWN_VIOLATIONS <= edges, f"no longer imported, remove from KNOWN_VIOLATIONS: {KNOWN_VIOLATIONS - edges}"


def test_stages_are_what_the_scripts_call():
    called = set()
    for script in (ROOT / "workflow" / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == PACKAGE and not node.level:
                called |= {f"{PACKAGE}.{a.name}" for a in node.names}
    assert called == STAGES


# --------------------------------------------------------------------------- the walker itself


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_walker_finds_a_cycle_through_a_local_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import helper\n",
        "pkg/b.py": "def helper():\n    from .a import thing  # hides the cycle at run time\n    return thing\n",
    })
    graph = import_graph(tmp_path, "pkg")
    cycle = find_cycle(graph)
    assert cycle is not None
    assert {(e.importer, e.imported, e.local) for e in cycle} == {("pkg.a", "pkg.b", False), ("pkg.b", "pkg.a", True)}


def test_walker_resolves_relative_and_absolute_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base.py": "",
        "pkg/heavy.py": "",
        "pkg/sub/__init__.py": "from . import inner\n",
        "pkg/sub/inner.py": ("from typing import TYPE_CHECKING\n"
                             "from ..base import x\n"
                             "from .. import heavy\n"
                             "import pkg.base\n"
                             "if TYPE_CHECKING:\n    from pkg.top import T\n"
                             "def f():\n    from pkg.heavy import y\n    import os\n"),
        "pkg/top.py": "from pkg.sub.inner import f\nfrom .sub import inner\nfrom . import sub\n",
    })
    graph = import_graph(tmp_path, "pkg")
    got = {(e.importer, e.imported, e.local) for edges in graph.values() for e in edges}
    assert got == {
        ("pkg.sub", "pkg.sub.inner", False),
        ("pkg.sub.inner", "pkg.base", False),
        ("pkg.sub.inner", "pkg.heavy", False),
        ("pkg.sub.inner", "pkg.heavy", True),
        ("pkg.top", "pkg.sub.inner", False),
        ("pkg.top", "pkg.sub", False),
    }
    assert find_cycle(graph) is None  # the TYPE_CHECKING import of pkg.top is left out
    assert [(e.importer, e.imported) for e in pointless_lazy_imports(graph)] == [("pkg.sub.inner", "pkg.heavy")]
