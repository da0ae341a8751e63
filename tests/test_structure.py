"""The shape of the code (DESIGN.md, "Files"): no script imports train.py, the project's import graph has
no cycle, and the four story files keep their budgets."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = {"model.py": 500, "train.py": 500, "sample.py": 450, "fid.py": 600}


def project_modules():
    """Every Python module of the project outside tests/, by dotted name."""
    mods = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "results", "__pycache__")]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return mods


def imports(path, mods):
    """The project modules that a file imports, anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in mods}
    return found


def test_no_script_imports_train():
    mods = project_modules()
    assert "train" in mods and "support.data" in mods and "experiments.bench" in mods  # the walk sees them
    importers = sorted(m for m, path in mods.items() if "train" in imports(path, mods))
    assert importers == []


def test_the_import_graph_has_no_cycle():
    mods = project_modules()
    graph = {m: imports(path, mods) - {m} for m, path in mods.items()}
    assert graph["train"] >= {"model", "support.data"} and "model" in graph["sample"]  # the graph is read
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", " -> ".join(stack + [m, n])  # a cycle
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("name", list(STORY))
def test_story_file_budgets(name):
    text = open(os.path.join(ROOT, name)).read()
    lines = text.splitlines()
    assert len(lines) <= STORY[name]
    assert sum(len(line) > 100 for line in lines) <= 0.05 * len(lines)


def test_no_function_over_100_lines():
    too_long = []
    for module, path in project_modules().items():
        for f in ast.walk(ast.parse(open(path).read())):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 100:
                too_long.append(f"{module}.{f.name}")
    assert too_long == []


def test_the_training_loop_starts_early():
    lines = open(os.path.join(ROOT, "train.py")).read().splitlines()
    assert next(i for i, line in enumerate(lines, 1) if line.strip().startswith("while step <")) < 320
