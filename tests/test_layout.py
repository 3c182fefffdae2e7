"""The code's layout: imports go one way (no cycle between the project's modules) and sit at the top of each
module, so that reading a module's first lines tells what it depends on."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(ROOT, "*.py"))
           if os.path.basename(p) != "conftest.py"}


def project_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(module, line, at top level) for every import of a project module."""
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        out += [(name, node.lineno, id(node) in top) for name in names if name in MODULES]
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            graph[name] = {m for m, _, _ in project_imports(ast.parse(f.read()))} - {name}
    return graph


def test_project_imports_are_at_the_top_of_each_module():
    inside = []
    for name, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            inside += [f"{name}.py:{line} imports {m}" for m, line, top in project_imports(ast.parse(f.read()))
                       if not top]
    assert inside == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"errors", "fsio", "config", "moe", "models", "trainer", "main"} <= set(graph)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # the ground floor depends on nothing of the project but itself
    assert graph["errors"] == set() and graph["fsio"] <= {"errors"} and graph["config"] <= {"errors"}
