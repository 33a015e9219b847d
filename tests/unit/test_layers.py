"""proxy/core imports in one direction: no circle between its modules, and
every import at the top of its file (none hidden inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "proxy" / "core"


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """The proxy.core modules a module imports (`from proxy.core import x` counts x)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: from the module's package
                package = name if is_package else name.rpartition(".")[0]
                base = ".".join([package.rsplit(".", node.level - 1)[0], node.module])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("proxy.core")}


def graph() -> dict[str, set[str]]:
    paths = sorted(CORE.rglob("*.py"))
    modules = {module_name(p): p for p in paths}
    edges = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        imports = core_imports(tree, name, path.name == "__init__.py")
        # A package's own __init__ runs before any of its modules: not an edge back.
        edges[name] = {m for m in imports if m in modules and m != name
                       and not name.startswith(m + ".")}
    return edges


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (["a", "b", "a"]), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        for target in sorted(edges.get(name, ())):
            circle = visit(target, [*path, name])
            if circle:
                return circle
        done.add(name)
        return None

    for name in sorted(edges):
        circle = visit(name, [])
        if circle:
            return circle
    return None


def test_core_modules_import_without_circles() -> None:
    edges = graph()
    assert len(edges) >= 25
    assert find_circle(edges) is None


def test_a_circle_is_found() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_inside_a_function() -> None:
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                where = f"{path.relative_to(CORE)}:{inner[0].lineno}" if inner else ""
                assert not inner, f"{where}: import in a function"
