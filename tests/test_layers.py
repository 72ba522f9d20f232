"""The package's layers, checked from its source: imports go down only, and no module imports itself back.

Layers, lowest first (CONTRIBUTING.md): the root modules (errors, runtime) < data < ssd < evaluation <
training < tracking < deploy < cli. ``deploy`` may import ``tracking`` only inside a function (to resolve
``runs:/`` and ``models:/`` URIs), so serving a model file never loads MLflow, and never imports ``training``
(what it needs of checkpoints lives in ``ssd``). Imports inside functions count like the others: a cycle hidden
in a function-level import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "maskssd"
LAYERS = {
    "data": 1,
    "ssd": 2,
    "evaluation": 3,
    "training": 4,
    "tracking": 5,
    "deploy": 6,
    "cli": 7,
    "__main__": 7,
}
LAZY_ONLY = {("deploy", "tracking")}
#: Layer pairs that never meet, even lazily: serving a model does not need the training code.
FORBIDDEN = {("deploy", "training")}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED = {("cli", "build_parser")}  # the argument parser: one flat list of options


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return top, LAYERS.get(top, 0)


def lazy_exports(package: str) -> dict[str, str]:
    """``_EXPORTS`` of a package ``__init__`` (name -> submodule), read from the source."""
    init = PACKAGE.parent.joinpath(*package.split("."), "__init__.py")
    if not init.is_file():
        return {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """``(imported maskssd module, at module level, line)`` for every import in a file."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # type-only imports never run
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(
                    (a.name, inner, child.lineno) for a in child.names if a.name.startswith("maskssd")
                )
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("maskssd"):
                exports = lazy_exports(child.module)
                for a in child.names:
                    if a.name in exports:
                        target = f"{child.module}.{exports[a.name]}"
                    elif (
                        PACKAGE.parent.joinpath(*child.module.split("."), f"{a.name}.py").is_file()
                        or PACKAGE.parent.joinpath(*child.module.split("."), a.name).is_dir()
                    ):
                        target = f"{child.module}.{a.name}"
                    else:
                        target = child.module
                    found.append((target, inner, child.lineno))
            visit(child, inner)

    visit(tree, True)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(p): imports(p) for p in SOURCES}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down(path: Path) -> None:
    me = module_name(path)
    my_top, my_rank = layer_of(me)
    for target, top_level, line in GRAPH[me]:
        their_top, their_rank = layer_of(target)
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        assert their_rank <= my_rank, f"upward import: {where} ({my_top} is below {their_top})"
        assert (my_top, their_top) not in FORBIDDEN, f"{where}: {my_top} never imports {their_top}"
        if (my_top, their_top) in LAZY_ONLY:
            assert not top_level, (
                f"{where} at module level; {my_top} may import {their_top} only inside a function"
            )


def import_edges() -> dict[str, list[str]]:
    """Every import between maskssd modules, at module level or inside a function, as ``module -> targets``."""
    return {m: sorted({t for t, _, _ in deps if t in GRAPH and t != m}) for m, deps in GRAPH.items()}


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """One import cycle (``a -> b -> a``), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in edges.get(m, []):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = dfs(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_no_import_cycles() -> None:
    """Imports between maskssd modules, function-level ones included, form no cycle."""
    cycle = find_cycle(import_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from maskssd.cli.console import out\n")
    edges = {"maskssd.cli.commands": ["maskssd.cli.console"], "maskssd.cli.console": ["maskssd.cli.commands"]}
    assert ("maskssd.cli.console", False, 2) in imports(a)  # a function-level import is found ...
    assert find_cycle(edges) == ["maskssd.cli.commands", "maskssd.cli.console", "maskssd.cli.commands"]
    assert find_cycle({"a": ["b"], "b": []}) is None  # ... and a cycle through it is one


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker is not vacuous: a data module importing the CLI is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from maskssd.cli import main\n\ndef f():\n    from maskssd.tracking import runs\n")
    found = imports(bad)
    assert ("maskssd.cli", True, 1) in found and ("maskssd.tracking.runs", False, 4) in found
    assert layer_of("maskssd.cli")[1] > layer_of("maskssd.data.voc")[1]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_short(path: Path) -> None:
    text = path.read_text()
    assert text.count("\n") <= MAX_MODULE_LINES, (
        f"{path.name}: over {MAX_MODULE_LINES} lines; split it by job"
    )
    top, _ = layer_of(module_name(path))
    for node in ast.walk(ast.parse(text)):
        if (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (top, node.name) not in LONG_FUNCTIONS_ALLOWED
        ):
            length = (
                node.end_lineno - node.body[0].lineno + 1
            )  # the body: a formatter-split signature is not code
            assert length <= MAX_FUNCTION_LINES, (
                f"{path.name}:{node.lineno} {node.name}'s body is {length} lines"
            )


def test_the_library_never_sees_argparse() -> None:
    users = [module_name(p) for p in SOURCES if "argparse" in {a for a, *_ in _plain_imports(p)}]
    assert users and all(u.startswith("maskssd.cli") for u in users), users


def _plain_imports(path: Path) -> list[tuple[str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name,) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module,))
    return out


@pytest.mark.parametrize("package", ["data", "ssd", "evaluation", "training", "tracking", "deploy"])
def test_every_public_name_resolves(package: str) -> None:
    import importlib

    mod = importlib.import_module(f"maskssd.{package}")
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert mod.__all__ and not missing, missing
