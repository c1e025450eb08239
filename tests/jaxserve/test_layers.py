"""The layers of the jaxserve package import only downwards (entrypoints -> engine ->
worker, core -> models -> pallas_kernels), and its module graph has no cycle."""

import ast
from pathlib import Path

import jaxserve

PACKAGE = Path(jaxserve.__file__).parent
LAYERS = ("core", "worker", "engine", "entrypoints")
# What each sub-package may import from the others (shared top-level modules always allowed).
ALLOWED = {"core": set(), "worker": {"core"}, "engine": {"core", "worker"},
           "entrypoints": {"core", "worker", "engine"}}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("jaxserve")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.startswith("jaxserve"):
            out |= {f"{node.module}.{a.name}" if node.module in ("jaxserve", "jaxserve.entrypoints") else node.module
                    for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py") if "protos" not in p.parts}
    return {name: {m for m in _imports(ast.parse(p.read_text())) if m in modules} for name, p in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def test_layers_import_only_downwards():
    bad = []
    for module, deps in graph().items():
        layer = _layer(module)
        if layer is None:
            continue
        for dep in deps:
            other = _layer(dep)
            if other is not None and other != layer and other not in ALLOWED[layer]:
                bad.append(f"{module} -> {dep}")
    assert not bad, bad


def test_shared_modules_import_no_layer():
    g = graph()
    shared = [m for m in g if _layer(m) is None and m != "jaxserve"]
    assert {"jaxserve.config", "jaxserve.sampling_params", "jaxserve.outputs"} <= set(shared)
    bad = [f"{m} -> {d}" for m in shared for d in g[m] if _layer(d) is not None]
    assert not bad, bad


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            assert state.get(dep) != 1, " -> ".join(stack[stack.index(dep):] + [dep])
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(g):
        if module not in state:
            visit(module, [module])
