"""The package's modules import one another one way only: no import cycle, counting function-level imports.

A cycle works until someone moves an import, then fails at import time with a half-built module; the
exempt <-> moe_layer pair did exactly that behind a local import (issue 16, item 7).
"""

import ast
import pathlib

import megatron_moe_lossfree

PACKAGE_DIR = pathlib.Path(megatron_moe_lossfree.__file__).parent


def package_import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (top level or inside functions)."""
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ("megatron_moe_lossfree",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        deps.add(f"{base}.{alias.name}")
                    elif base in modules:
                        deps.add(base)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in modules)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}  # 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_package_has_no_import_cycle():
    graph = package_import_graph()
    assert "megatron_moe_lossfree.megatron.moe_layer" in graph  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_exempt_depends_on_moe_layer_and_not_back():
    graph = package_import_graph()
    assert "megatron_moe_lossfree.megatron.moe_layer" in graph["megatron_moe_lossfree.megatron.exempt"]
    assert "megatron_moe_lossfree.megatron.exempt" not in graph["megatron_moe_lossfree.megatron.moe_layer"]


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
