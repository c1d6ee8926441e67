"""Checks the project's structure rules; prints each violation and exits 1 if there is any.

    .venv/bin/python scripts/check_structure.py        (also run by tests/test_structure.py)

1. No import cycle among the project's modules. Every import counts, also the ones inside functions: a deferred
   import hides a cycle from the interpreter, not from the reader.
2. Ray stays in its rooms: model/, core/, training/ and tasks/ never import ray; corpus/ may import ray.data only
   (its streaming pipeline), never ray.init or the rest of Ray.
3. No function in actors/, jobs/ or cluster/ runs over MAX_LINES lines unless its docstring says why, in a sentence
   that starts with "Long because".
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "model", "training", "corpus", "tasks", "cluster", "actors", "jobs")
RAY_FREE = ("core", "model", "training", "tasks")
RAY_DATA_ONLY = ("corpus",)
LENGTH_CHECKED = ("actors", "jobs", "cluster")
MAX_LINES = 80


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(tree: ast.AST, module: str, is_pkg: bool) -> list[str]:
    """Every dotted name an import statement anywhere in ``tree`` mentions (``from a import b`` gives a and a.b)."""
    names = []
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            pkg = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            names.append(pkg)
            names += [f"{pkg}.{a.name}" for a in node.names]
    return names


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = {n for n in imported_names(tree, name, path.name == "__init__.py") if n in mods}
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def ray_violations(mods: dict[str, Path], root: Path = ROOT) -> list[str]:
    out = []
    for name, path in mods.items():
        room = name.split(".")[0]
        if room not in RAY_FREE + RAY_DATA_ONLY:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for n in imported_names(tree, name, path.name == "__init__.py"):
            if n != "ray" and not n.startswith("ray."):
                continue
            allowed = room in RAY_DATA_ONLY and (n == "ray.data" or n.startswith("ray.data."))
            if not allowed and not (room in RAY_DATA_ONLY and n == "ray"):  # "import ray.data" also names "ray"
                out.append(f"{path.relative_to(root)}: imports {n} ({room}/ must not use Ray"
                           f"{' beyond ray.data' if room in RAY_DATA_ONLY else ''})")
        if room in RAY_DATA_ONLY:  # "import ray.data" binds the name ray: its other attributes are still off limits
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ray"
                        and node.attr != "data"):
                    out.append(f"{path.relative_to(root)}:{node.lineno}: uses ray.{node.attr} ({room}/ may use "
                               f"ray.data only)")
    return out


def long_functions(mods: dict[str, Path], root: Path = ROOT) -> list[str]:
    out = []
    for name, path in mods.items():
        if name.split(".")[0] not in LENGTH_CHECKED:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if length > MAX_LINES and "Long because" not in doc:
                out.append(f"{path.relative_to(root)}:{node.lineno}: {node.name}() is {length} lines "
                           f"(> {MAX_LINES}; split it, or say why in its docstring: \"Long because …\")")
    return out


def check(root: Path = ROOT) -> list[str]:
    mods = modules(root)
    problems = [f"import cycle: {' ↔ '.join(c)}" for c in cycles(import_graph(mods))]
    return problems + ray_violations(mods, root) + long_functions(mods, root)


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"check_structure: {len(problems)} problem(s) in {len(modules())} modules", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
