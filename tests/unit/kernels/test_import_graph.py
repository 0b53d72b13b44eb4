"""The kernels package imports as a DAG, at module level only, and nothing below it imports it.

Read from the sources (ast), so no import machinery hides an edge: a function-level import of an
edgebox module would hide a cycle, so there is none in kernels/ (onnx/onnxruntime, optional and
heavy, are the only function-level imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import edgebox

ROOT = Path(edgebox.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(module-level edgebox imports, imports inside functions) of one source file."""
    tree = ast.parse(path.read_text())
    top, inner = set(), []
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(x) for f in funcs for x in ast.walk(f) if isinstance(x, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        if id(node) in nested:
            inner.extend(names)
        else:
            top.update(n for n in names if n.startswith("edgebox."))
    return top, inner


def _graph(package: str) -> dict[str, set[str]]:
    files = sorted((ROOT / package.split(".", 1)[1].replace(".", "/")).rglob("*.py"))
    mods = {_module(f): f for f in files}
    return {m: {i for i in _imports(f)[0] if i in mods} - {m} for m, f in mods.items()}


def test_kernels_import_graph_is_acyclic():
    graph = _graph("edgebox.kernels")
    done, stack = set(), []

    def visit(m):
        assert m not in stack, "import cycle: " + " -> ".join(stack[stack.index(m) :] + [m])
        if m in done:
            return
        stack.append(m)
        for n in graph[m]:
            visit(n)
        stack.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_kernels_import_edgebox_modules_at_module_level_only():
    for f in sorted((ROOT / "kernels").rglob("*.py")):
        inner = [n for n in _imports(f)[1] if n.startswith("edgebox")]
        assert not inner, f"{f.name} imports {inner} inside a function"


def test_gguf_does_not_import_the_kernels():
    for f in sorted((ROOT / "gguf").rglob("*.py")):
        top, inner = _imports(f)
        assert not [n for n in list(top) + inner if n.startswith("edgebox.kernels")], f.name
