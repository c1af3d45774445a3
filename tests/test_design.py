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


# JSON fields named like a problem code (a field is a name, not a code): convert's "lossy_cast" counts
JSON_FIELDS = {"lossy_cast"}


def _string_literals(path: str):
    """(line, value) of every string constant in `path` that is a value: not a docstring, a subscript (the renderer
    reads JSON fields such as diff's "quantized_keys"), or a dict key among JSON_FIELDS."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            names.update(id(k) for k in node.keys if isinstance(k, ast.Constant) and k.value in JSON_FIELDS)
        elif isinstance(node, ast.Subscript):
            names.add(id(node.slice))
        elif isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            names.add(id(node.body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in names:
            yield node.lineno, node.value


def test_no_severity_or_problem_code_literal_outside_the_data_model():
    """Severities and codes are the Enums of ckpttool/model.py: a literal "error" or "missing_file" elsewhere is meaning
    carried in a string, which a typo turns into another meaning silently."""
    from ckpttool.model import Code, Severity

    vocabulary = {c.value for c in Code} | {s.value for s in Severity}
    found = [f"{module}:{line}: {value!r}" for module, path in modules().items() if module != "ckpttool.model"
             for line, value in _string_literals(path) if value in vocabulary]
    assert found == []


def test_every_reader_satisfies_the_protocol():
    """Each reader in READERS has detect(path) and read(path, *, role=None, name=None), and declares what it reads."""
    import importlib
    import inspect

    from ckpttool.formats import READERS

    assert len({r.module for r in READERS}) == len(READERS)
    for entry in READERS:
        module = importlib.import_module(f"ckpttool.formats.{entry.module}")
        assert entry.folders or entry.files, entry
        assert list(inspect.signature(module.detect).parameters) == ["path"], entry
        params = inspect.signature(module.read).parameters
        assert list(params) == ["path", "role", "name"], entry
        assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY and params[p].default is None
                   for p in ("role", "name")), entry


def test_no_profile_reads_a_display_label():
    """A profile gives a counter its meaning from where it was read (StepSource.record and .key), never from the label
    shown to users (StepSource.source): in ckpttool/trainers/ only a profile's own `source` (its citation) is read."""
    from ckpttool import trainers
    from ckpttool.model import Record

    for module, path in modules().items():
        if module.startswith("ckpttool.trainers"):
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.Attribute) and node.attr == "source":
                    assert isinstance(node.value, ast.Name) and node.value.id == "self", f"{module}:{node.lineno}"
    every = trainers.PATH_PROFILES + tuple(n for names in trainers.CONTENT_PROFILES.values() for n in names)
    for profile in trainers.path_profiles(every):
        for record, pattern, meaning in profile.counter_meanings:
            assert isinstance(record, Record) and isinstance(pattern, str) and meaning, profile
