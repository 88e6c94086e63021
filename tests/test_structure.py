"""The package's structure keeps its rules (docs/architecture.md): no import circles between
slt's modules, lazy imports included; no private name taken across modules; no module over
~400 lines nor function over ~60 without a stated reason; a wing's `__init__.py` only names
what the wing offers.

Read from the source with `ast`, so an import inside a function counts as much as one at the
top: a lazy import that breaks a circle at run time still ties two modules both ways.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "slt"

# Edges a circle may use, each with its reason.
ALLOWED_EDGES = {
    ("slt.ticket", "slt.export"):
        "Ticket.to_module calls export.to_module: a documented convenience on the ticket",
}

# Modules and functions allowed past the limits, each with its reason.
LONG_MODULES: dict[str, str] = {}
LONG_FUNCTIONS: dict[str, str] = {}
MODULE_LINES = 400
FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of slt by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _absolute(name: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom in module `name` names (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    package = name.split(".")
    is_package = modules()[name].name == "__init__.py"
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, tree: ast.AST, known: set[str]) -> list[tuple[str, str, str]]:
    """(imported slt module, name taken or '', line) for every import in the tree, lazy ones
    included. `from slt.x import y` names module slt.x.y where that is a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "slt":
                    found.append((alias.name, "", f"line {node.lineno}"))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, node)
            if base.split(".")[0] != "slt":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append((sub, "", f"line {node.lineno}"))
                else:
                    found.append((base, alias.name, f"line {node.lineno}"))
    return found


def graph() -> dict[str, dict[str, str]]:
    """module -> {imported module: where}, over slt's own modules."""
    mods = modules()
    known = set(mods)
    edges: dict[str, dict[str, str]] = {m: {} for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, _, where in imports(name, tree, known):
            if target in known and target != name:
                edges[name].setdefault(target, where)
                # importing slt.wing.x from outside the wing runs the wing's __init__ first
                wing = ".".join(target.split(".")[:2])
                if wing in known and wing != target and not name.startswith(wing + ".") \
                        and name != wing:
                    edges[name].setdefault(wing, f"{where}, through {target}")
    return edges


def circles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), allowed edges left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if (v, w) in ALLOWED_EDGES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    edges = graph()
    found = circles(edges)
    shown = [" <-> ".join(group) + ": " + "; ".join(
        f"{a} -> {b} ({edges[a][b]})" for a in group for b in group if b in edges[a])
        for group in found]
    assert not found, "import circles:\n" + "\n".join(shown)


def test_allowed_edges_exist():
    """An allowance for an edge that no longer exists is stale: remove it."""
    edges = graph()
    assert all(b in edges[a] for a, b in ALLOWED_EDGES)


def test_no_private_names_across_modules():
    mods = modules()
    known = set(mods)
    taken = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for target, imported, where in imports(name, tree, known):
            if target == name:
                continue
            if imported.startswith("_") and not imported.startswith("__"):
                taken.append(f"{name} takes {target}.{imported} ({where})")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _absolute(name, node).startswith("slt"):
                for alias in node.names:
                    full = f"{_absolute(name, node)}.{alias.name}"
                    if full in known:
                        aliases[alias.asname or alias.name] = full
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                taken.append(f"{name} uses {aliases[node.value.id]}.{node.attr} "
                             f"(line {node.lineno})")
    assert not taken, "private names used across modules:\n" + "\n".join(taken)


def test_module_and_function_sizes():
    too_long = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        lines = len(path.read_text().splitlines())
        if lines > MODULE_LINES and name not in LONG_MODULES:
            too_long.append(f"module {name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef,)):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        item.qualname = f"{node.name}.{item.name}"  # type: ignore[attr-defined]
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{name}.{getattr(node, 'qualname', node.name)}"
                size = node.end_lineno - node.lineno + 1
                if size > FUNCTION_LINES and qual not in LONG_FUNCTIONS:
                    too_long.append(f"function {qual}: {size} lines")
    assert not too_long, "past the limits without a stated reason:\n" + "\n".join(too_long)


def test_allowances_are_still_needed():
    for name in LONG_MODULES:
        assert len(modules()[name].read_text().splitlines()) > MODULE_LINES, name


@pytest.mark.parametrize("name", [m for m, p in modules().items()
                                  if p.name == "__init__.py" and m.count(".") == 1])
def test_wing_faces_only_name_what_the_wing_offers(name):
    """A wing's __init__.py imports and lists names; it defines nothing itself."""
    tree = ast.parse(modules()[name].read_text())
    defined = [n.name for n in tree.body
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert not defined, f"{name} defines {defined}: move them into a module of the wing"


def test_config_imports_nothing_of_slt_but_its_errors():
    """A stored config.toml reads back wherever slt is installed, whatever plug-ins it names."""
    edges = graph()
    outside = {f"{m} -> {t}" for m in edges if m == "slt.config" or m.startswith("slt.config.")
               for t in edges[m] if not (t == "slt.errors" or t.startswith("slt.config"))}
    assert not outside, sorted(outside)


DOCUMENTED = {  # import paths the docs and users rely on: they outlive any move
    "slt": ["search", "load_config", "load_ticket", "evaluate", "sweep", "report"],
    "slt.config": ["Config", "load_raw", "run_id", "config_hash", "from_dict"],
    "slt.data": ["open_batches", "DATASETS", "STREAMS", "Batches"],
    "slt.scorers": ["Scorer", "SCORERS", "Budget", "EpochContext", "create_scorer"],
    "slt.scorers.edge_popup": ["EdgePopup"],
    "slt.layers": ["MaskedConv2d", "MaskedLinear"],
    "slt.models": ["MODELS", "build_model"],
    "slt.ticket": ["load", "save", "Ticket"],
    "slt.export": ["export", "to_module", "load_state_dict"],
    "slt.errors": ["SltError", "ConfigError", "TicketError"],
    "slt.launch": ["PointJob"],  # pickled into queued SLURM jobs before the wings
}


def test_documented_import_paths_still_work():
    import subprocess
    import sys

    probe = "; ".join(f"import {m}; [getattr({m}, n) for n in {names!r}]"
                      for m, names in DOCUMENTED.items())
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_subpackage_shadows_a_public_function():
    """`slt.search` is a function: a subpackage slt/search/ would replace it on the package
    once imported. The same for the other public functions."""
    for name in DOCUMENTED["slt"]:
        assert f"slt.{name}" not in modules(), name


def test_sweep_status_and_config_read_without_torch():
    """`slt sweep status` and reading a config stay quick: neither imports torch."""
    import subprocess
    import sys

    code = "import sys, slt.sweeps.status, slt.resolve; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
