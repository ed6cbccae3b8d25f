"""The layering of the code: no upward imports, no cycles, no long modules without a reason, and
a README code-layout table that matches the tree.

Layers, bottom to top (a module may import its own layer or lower ones):

- L0 ``models.version``
- L1 ``models.*`` (the ML core) and ``pipeline.core.*`` (the pipeline's shared core); the two may
  not import each other
- L2 ``pipeline.stages.*`` and ``worker.*``
- L3 ``pipeline.tools.*``
- L4 the CLI layer: ``efficientad.*``, every module named ``commands`` or inside a ``commands``
  package, and ``experiments.*`` (scripts nothing imports)

Every import counts, also those inside functions and under ``if TYPE_CHECKING``; cycles are
looked for among module-level imports (what runs at import time). ``python
tests/test_architecture.py`` prints the figures.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("efficientad", "models", "pipeline", "worker", "experiments")
MAX_LINES = 500
LONG_REASON = "Why this module is long:"
LAYER_NAMES = {0: "L0 version", 1: "L1 core", 2: "L2 stages", 3: "L3 tools", 4: "L4 CLI"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: list[tuple[str, int, bool]] = field(default_factory=list)  # (target, line, top)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


@cache
def modules() -> dict[str, Module]:
    """Every non-test module of the project, parsed."""
    out: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name, is_package = _module_name(path)
            out[name] = Module(name, path, is_package, ast.parse(path.read_text(), str(path)))
    for module in out.values():
        module.imports = _imports(module, out)
    return out


def _resolve(target: str, known: dict[str, Module]) -> str | None:
    """The project module ``target`` names (itself or its longest known prefix), else None."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in known:
            return name
        parts.pop()
    return None


def _imports(module: Module, known: dict[str, Module]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level) for every import statement."""
    top_level = {id(node) for node in _module_level_nodes(module.tree)}
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(module.tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the module pkg.sub when there is one
            targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
            targets = [t if _resolve(t, known) == t else base for t in targets]
        for target in targets:
            resolved = _resolve(target, known)
            if resolved is not None and resolved != module.name:
                found.append((resolved, node.lineno, id(node) in top_level))
    return found


def _module_level_nodes(tree: ast.Module) -> list[ast.stmt]:
    """Statements that run at import time: the body, and the bodies of module-level if/try."""
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If | ast.Try):
            todo += node.body + node.orelse
            if isinstance(node, ast.Try):
                todo += [s for handler in node.handlers for s in handler.body] + node.finalbody
    return out


def layer(name: str) -> int:
    parts = name.split(".")
    if parts[0] in ("efficientad", "experiments") or "commands" in parts:
        return 4
    if name == "models.version":
        return 0
    if parts[0] == "models" or name == "pipeline" or name.startswith("pipeline.core"):
        return 1
    if name.startswith("pipeline.stages") or parts[0] == "worker":
        return 2
    if name.startswith("pipeline.tools"):
        return 3
    raise AssertionError(f"{name}: no layer (add it to tests/test_architecture.py)")


def _core_group(name: str) -> str | None:
    """Which of the two L1 groups ``name`` belongs to (they may not import each other)."""
    if layer(name) != 1:
        return None
    return "models" if name.startswith("models") else "pipeline.core"


def upward_imports() -> list[str]:
    problems = []
    for module in modules().values():
        for target, line, _ in module.imports:
            where = f"{module.path.relative_to(REPO)}:{line}: {module.name} -> {target}"
            if layer(target) > layer(module.name):
                problems.append(
                    f"{where} imports upward ({LAYER_NAMES[layer(module.name)]} -> "
                    f"{LAYER_NAMES[layer(target)]})"
                )
            groups = (_core_group(module.name), _core_group(target))
            if None not in groups and groups[0] != groups[1]:
                problems.append(f"{where} crosses the L1 groups ({groups[0]} -> {groups[1]})")
    return problems


def cycles() -> list[list[str]]:
    """Strongly connected components (size > 1) of the module-level import graph."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module in modules().values():
        for target, _, top in module.imports:
            if top:
                graph[module.name].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for name in sorted(modules()):
        if name not in index:
            visit(name)
    return found


def long_modules() -> dict[str, tuple[int, str | None]]:
    """Modules over MAX_LINES lines -> (lines, the reason written at their top or None)."""
    out = {}
    for module in modules().values():
        lines = len(module.path.read_text().splitlines())
        if lines > MAX_LINES:
            doc = ast.get_docstring(module.tree) or ""
            reason = next((line for line in doc.splitlines() if line.startswith(LONG_REASON)), None)
            out[module.name] = (lines, reason)
    return out


def layout_table() -> list[str]:
    """The paths named in the first column of README.md's code-layout table."""
    text = (REPO / "README.md").read_text()
    start = text.index("Code layout")
    rows = []
    in_table = False
    for line in text[start:].splitlines():
        if line.startswith("|"):
            in_table = True
            rows.append(line)
        elif in_table:
            break
    paths = []
    for row in rows[2:]:  # header and rule
        first = row.split("|")[1]
        paths += re.findall(r"`([^`]+)`", first)
    return paths


# ------------------------------------------------------------------------------------- tests


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer(name)


def test_no_module_imports_upward() -> None:
    problems = upward_imports()
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_cycles() -> None:
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_long_module_without_a_reason() -> None:
    missing = [
        f"{name}: {lines} lines (> {MAX_LINES}) and no '{LONG_REASON}' line in its docstring"
        for name, (lines, reason) in long_modules().items()
        if reason is None
    ]
    assert not missing, "\n".join(missing)


def test_readme_layout_table_matches_the_tree() -> None:
    listed = layout_table()
    assert listed, "README.md has no code-layout table"
    missing = [p for p in listed if not (REPO / p.rstrip("/")).exists()]
    assert not missing, f"README code-layout table names paths that do not exist: {missing}"
    folders = [p.rstrip("/") + "/" for p in listed if p.endswith("/")]
    files = {p for p in listed if not p.endswith("/")}

    def covered(path: str) -> bool:
        if path in files or any(path.startswith(f) for f in folders):
            return True
        if path.endswith("__init__.py"):  # a package is covered by a row naming its modules
            package = path.removesuffix("__init__.py")
            return any(f.startswith(package) for f in [*files, *folders])
        return False

    uncovered = [
        str(m.path.relative_to(REPO))
        for m in modules().values()
        if not covered(str(m.path.relative_to(REPO)))
    ]
    assert not uncovered, f"modules no row of README's code-layout table covers: {uncovered}"


def figures() -> str:
    """The numbers of the layering, for reports: modules, edges, cycles, upward imports."""
    edges = {(m.name, t) for m in modules().values() for t, _, _ in m.imports}
    top_edges = {(m.name, t) for m in modules().values() for t, _, top in m.imports if top}
    by_layer: dict[int, int] = defaultdict(int)
    for name in modules():
        by_layer[layer(name)] += 1
    counts = ", ".join(f"{LAYER_NAMES[k]} {v}" for k, v in sorted(by_layer.items()))
    long = "; ".join(f"{n} ({lines})" for n, (lines, _) in sorted(long_modules().items()))
    return "\n".join(
        [
            f"modules: {len(modules())} ({counts})",
            f"import edges (module -> module): {len(edges)}, {len(top_edges)} at module level",
            f"cycles: {len(cycles())}",
            f"upward imports: {len(upward_imports())}",
            f"modules over {MAX_LINES} lines: {long or 'none'}",
        ]
    )


if __name__ == "__main__":
    print(figures())
