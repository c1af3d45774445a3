"""Data flows down: no module of ckpttool imports, at any depth and from any function, a module that imports it back.

(formats/ reads bytes and never asks trainers/; trainers/ interpret and may use the readers; ckpttool/checkpoint.py
composes the two; manifest and verify share ckpttool/checksums.py rather than each other.)
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "ckpttool")


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = "ckpttool." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def imports(path: str, known: dict) -> set[str]:
    """The ckpttool modules `path` imports anywhere in it (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                         for a in node.names)
    return {m for m in found if m in known}


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    known = modules()
    # a submodule reaching a sibling through its own package (`from ckpttool.formats import torchfile` inside
    # formats/) is how Python packages work, not a circle between layers
    graph = {m: {t for t in imports(p, known) if t != m and not m.startswith(t + ".")} for m, p in known.items()}
    assert cycles(graph) == []


def test_formats_never_ask_trainers():
    known = modules()
    for module, path in known.items():
        if module.startswith("ckpttool.formats"):
            assert not {t for t in imports(path, known) if t.startswith(("ckpttool.trainers", "ckpttool.operations",
                                                                         "ckpttool.checkpoint"))}, module
