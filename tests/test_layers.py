"""The package's folders are its layers, and imports point one way (docs/architecture.md).

Every `import labkit...` in every module is read from its syntax tree, at module level and inside
functions alike (an import hidden in a function is still a dependency), and checked against the
layer order below; the module graph must have no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "labkit"
#: lower layers first; a module may import its own layer and those before it
LAYERS = ("core", "model", "drafters", "decode", "pipeline", "measure", "lab", "__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def labkit_imports(path: Path) -> set[str]:
    """The labkit modules a file imports (a `from labkit.x import name` that names a module counts
    that module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("labkit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit"):
            found.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                        (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists():
                    found.add(sub)
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package itself (labkit/__init__.py)


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    return {module_name(f): labkit_imports(f) - {module_name(f)} for f in files}


def test_every_module_sits_in_a_layer_folder_and_at_most_three_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 3, top
    for module in graph():
        assert layer(module) in LAYERS + (None,), f"{module} is in no layer folder"


def test_imports_point_down_the_layers():
    bad = []
    for module, imports in graph().items():
        mine = layer(module)
        if mine is None:  # labkit/__init__.py re-exports the core API from the layers below decode
            bad += [(module, i) for i in imports if LAYERS.index(layer(i)) > LAYERS.index("decode")]
            continue
        bad += [(module, i) for i in imports
                if layer(i) is None or LAYERS.index(layer(i)) > LAYERS.index(mine)]
    assert not bad, "upward imports: " + ", ".join(f"{m} -> {i}" for m, i in bad)


def test_the_math_layer_imports_no_model():
    for module, imports in graph().items():
        if layer(module) == "core":
            assert all(layer(i) == "core" for i in imports), (module, imports)


def test_there_is_no_import_circle():
    g = graph()
    g = {m: {i for i in imports if i in g} for m, imports in g.items()}
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import circle: " + " -> ".join(path[path.index(m):] + [m])
        state[m] = 1
        for i in sorted(g[m]):
            visit(i, path + [m])
        state[m] = 2
        order.append(m)

    for m in sorted(g):
        visit(m, [])
