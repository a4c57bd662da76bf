"""The folder plan holds: no import circles, and no module imports a higher floor.

Every ``import`` statement in ``src/prunekit`` counts, lazy ones inside functions included. A
package's ``__init__`` may import anything inside its own package (that is where registration
happens). The floors are the table in docs/architecture.md; this test is what keeps it true.
"""
import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "prunekit"

#: lowest first; a module may import its own floor and those below (longest prefix wins)
FLOORS = {
    "prunekit._version": 0, "prunekit.calls": 0, "prunekit.llm": 0, "prunekit.sparsity": 0,
    "prunekit.layers": 1, "prunekit.zoo": 1,
    "prunekit.oneshot.solvers": 2,
    "prunekit.oneshot.runtime": 3,
    "prunekit.oneshot": 4, "prunekit.training": 4, "prunekit.structures": 4,
    "prunekit.oneshot.methods": 5, "prunekit.formats": 5, "prunekit.report": 5, "prunekit.speed": 5, "prunekit.plots": 5,
    "prunekit.accelerate": 5, "prunekit.eval": 5,
    "prunekit.jobs": 6,
    "prunekit.cli": 7,
    "prunekit": 8,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def imports(name: str, path: Path) -> set[str]:
    """The prunekit modules ``name`` imports (a name imported from a package that is itself a
    submodule counts as that submodule)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("prunekit")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("prunekit"):
                continue
            subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES}
            found |= subs if subs and len(subs) == len(node.names) else subs | {module}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def _own_package(importer: str, imported: str) -> bool:
    return MODULES[importer].name == "__init__.py" and imported.startswith(importer + ".")


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_module_imports_a_higher_floor(name):
    up = [m for m in GRAPH[name] if floor(m) > floor(name) and not _own_package(name, m)]
    assert not up, f"{name} (floor {floor(name)}) imports {[(m, floor(m)) for m in up]}; see docs/architecture.md"


def test_no_import_circles():
    edges = GRAPH
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_every_module_has_a_floor():
    """A new top-level module or folder must be placed in the table (and in docs/architecture.md)."""
    loose = [n for n in MODULES if max((p for p in FLOORS if n == p or n.startswith(p + ".")), key=len) == "prunekit"
             and n != "prunekit"]
    assert not loose, f"modules without a floor: {loose}"


def _documented_floors() -> dict[str, int]:
    """The folder table of docs/architecture.md as {module: floor} (``x/`` and ``x.py`` -> prunekit.x)."""
    page = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    out = {}
    for cells in (line.strip("|").split("|") for line in page.splitlines() if re.match(r"^\|.*\| *\d+ *\|$", line)):
        for name in re.findall(r"`([\w/.]+)`", cells[0]):
            parts = name.removesuffix("/").removesuffix(".py").split("/")
            out[".".join(["prunekit"] + [p for p in parts if p != "__init__"])] = int(cells[-1])
    return out


def test_the_documented_floors_are_these():
    assert _documented_floors() == FLOORS, "docs/architecture.md's table and FLOORS disagree"


def test_test_file_names_are_unique():
    """pytest imports test files by basename (tests/ folders are not packages): two test files
    with one name stop collection on a clean clone ("import file mismatch")."""
    tests = Path(__file__).resolve().parent
    seen: dict[str, Path] = {}
    repeated = []
    for path in sorted(tests.rglob("test_*.py")):
        if path.name in seen:
            repeated.append(f"{seen[path.name].relative_to(tests)} and {path.relative_to(tests)}")
        seen.setdefault(path.name, path)
    assert not repeated, "rename one of each pair: " + "; ".join(repeated)
