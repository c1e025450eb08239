"""The import graph of the models package: top-level imports only, and no cycle."""

import ast
from pathlib import Path

from jaxserve import models

PACKAGE = Path(models.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("jaxserve", "models") + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST) -> list[str]:
    """jaxserve.models.* modules named by an import statement (`from jaxserve.models import x` counts as jaxserve.models.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("jaxserve.models")]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module == "jaxserve.models":
            return [f"jaxserve.models.{a.name}" for a in node.names]
        if node.module.startswith("jaxserve.models"):
            return [node.module]
    return []


def _scan() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> models modules it imports, 'module:line' of every import inside a function)."""
    graph: dict[str, set[str]] = {}
    local: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            targets = _imported(node)
            graph[name].update(targets)
            if targets and id(node) not in top_level:
                local.append(f"{name}:{node.lineno} imports {', '.join(targets)}")
    return graph, local


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_models_modules_import_only_at_top_level():
    _, local = _scan()
    assert not local, "function-local imports of models modules:\n" + "\n".join(local)


def test_models_import_graph_has_no_cycle():
    graph, _ = _scan()
    assert "jaxserve.models.config" in graph and "jaxserve.models.registry" in graph["jaxserve.models.config"]
    unknown = {dep for deps in graph.values() for dep in deps} - set(graph)
    assert not unknown, f"imports of models modules that do not exist: {sorted(unknown)}"
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
