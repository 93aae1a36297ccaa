"""The package's modules import each other without a circle (STYLE: data flows down), read from the source.

Module-level imports count, those under `if TYPE_CHECKING:` too (a circle there is still two modules that
need each other); imports inside a function are deliberate lazy edges and are left out.
"""

import ast
import graphlib
from pathlib import Path

import deepseek_lm

PACKAGE = Path(deepseek_lm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that `tree` imports at module level (into `if` blocks, not into functions)."""
    found, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.If, ast.Try)):
            todo += [*node.body, *node.orelse, *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from deepseek_lm.train import loop` imports a module, `from ...loop import X` a name of one
            found |= {f"{node.module}.{a.name}" for a in node.names} & known or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & known


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: module_level_imports(ast.parse(p.read_text()), known) for name, p in files.items()}


def test_no_import_circles():
    graph = import_graph()
    assert "deepseek_lm.train.loop" not in graph["deepseek_lm.train.monitor"]  # the monitor needs no loop
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None


def test_the_graph_sees_type_checking_imports():
    """The check would have caught the loop ↔ monitor circle, which went through `if TYPE_CHECKING:`."""
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deepseek_lm.train.loop import X\n"
    assert module_level_imports(ast.parse(source), {"deepseek_lm.train.loop"}) == {"deepseek_lm.train.loop"}
    lazy = "def f():\n    from deepseek_lm.train.loop import X\n"
    assert module_level_imports(ast.parse(lazy), {"deepseek_lm.train.loop"}) == set()
