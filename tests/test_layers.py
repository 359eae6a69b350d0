"""The package's shape: layers without back-edges, methods that carry their own behaviour, and
Flower adapters and workflows a reader can follow (no function over ~50 lines)."""

import ast
from pathlib import Path

import pytest

from medfedpure.attacks import SUITE, TRAINING_ATTACKS
from medfedpure.config import DETECTOR_NAMES, METHOD_NAMES

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medfedpure"

# from the bottom: a module may import its own layer and those below, never one above
LAYERS = [
    {"config", "storage", "runfolder", "metrics", "loop", "attacks", "reporting"},
    {"data", "models", "defense"},
    {"methods"},
    {"federation"},
    {"evaluation"},
    {"workflows", "serving"},
    {"cli", "__init__"},
]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts


def _layer(top: str) -> int:
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"'{top}' is in no layer of tests/test_layers.py: add it where it belongs")


def _imports(path: Path, parts: tuple[str, ...]):
    """Every medfedpure module `path` imports (at module level or inside a function)."""
    package = ["medfedpure", *parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module or not node.level else [f"{target}.{a.name}" for a in node.names]
            for name in names:
                if name.startswith("medfedpure"):
                    yield node.lineno, name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("medfedpure"):
                    yield node.lineno, alias.name


def test_no_module_imports_from_a_higher_layer():
    back_edges = []
    for path, parts in _modules():
        own = _layer(parts[0])
        for line, target in _imports(path, parts):
            pieces = target.split(".")
            top = pieces[1] if len(pieces) > 1 else "__init__"
            if _layer(top) > own:
                back_edges.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not back_edges, "imports from a higher layer:\n" + "\n".join(back_edges)


def test_the_layer_check_sees_a_back_edge(tmp_path):
    """The check above can fail: a lower module importing a higher one is caught."""
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from medfedpure.workflows.experiment import run_experiment\n")
    found = list(_imports(path, ("data", "bad")))
    assert found == [(2, "medfedpure.workflows.experiment")]
    assert _layer("workflows") > _layer("data")


def _name_checks(tree: ast.AST, names=METHOD_NAMES) -> list[int]:
    """Lines comparing something with one of `names` (`== "fedem"`, `in {"fedem", "pfeddef"}`)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            values = operand.elts if isinstance(operand, (ast.Set, ast.Tuple, ast.List)) else [operand]
            if any(isinstance(v, ast.Constant) and v.value in names for v in values):
                lines.append(node.lineno)
    return lines


def test_method_names_are_compared_only_in_the_registry():
    found = []
    for path, parts in _modules():
        if parts[0] in {"methods", "config"}:
            continue
        found += [f"{path.relative_to(PACKAGE)}:{line}" for line in _name_checks(ast.parse(path.read_text()))]
    assert not found, "method-name checks outside methods/ (ask the method instead):\n" + "\n".join(found)
    assert _name_checks(ast.parse('if cfg.method.name in {"fedem", "pfeddef"}:\n    pass\n')) == [1]


@pytest.mark.parametrize("kind, names, home", [
    ("attack", (*SUITE, *TRAINING_ATTACKS), ("attacks", "registry")),
    ("detector", DETECTOR_NAMES, ("defense", "detectors")),
])
def test_attack_and_detector_names_are_compared_only_in_their_registry(kind, names, home):
    """An attack's or a detector's facts live in its registry: nothing else asks `name == "square"`.
    (Phase names that are also detector names, the MAE's "mae", are told apart by what they compare.)"""
    found = []
    for path, parts in _modules():
        if parts == home:
            continue
        tree = ast.parse(path.read_text())
        found += [f"{path.relative_to(PACKAGE)}:{line}" for line in _name_checks(tree, names)
                  if kind == "attack" or "detector" in ast.get_source_segment(path.read_text(), _node_at(tree, line))]
    assert not found, f"{kind}-name checks outside {'/'.join(home)}.py (ask the registry):\n" + "\n".join(found)
    assert _name_checks(ast.parse('if name == "square":\n    pass\n'), SUITE) == [1]


def _node_at(tree: ast.AST, line: int) -> ast.AST:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Compare) and n.lineno == line)


@pytest.mark.parametrize("package", ["federation", "workflows"])
def test_adapters_and_workflows_have_no_long_functions(package):
    long = []
    for path in sorted((PACKAGE / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 50:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 50 lines:\n" + "\n".join(long)


def _table_rules(text: str) -> list[int]:
    """Lines of source that spell a markdown table's rule row (`|---|`) themselves."""
    return [i for i, line in enumerate(text.splitlines(), 1) if "|---" in line or '"---|"' in line.replace(" ", "")]


def test_markdown_tables_are_made_by_the_one_renderer():
    """Every markdown table of a run's documents is made by `reporting.markdown.table`: no module
    spells a table's rule row, so a column is added or escaped in one place."""
    home = PACKAGE / "reporting" / "markdown.py"
    found = [f"{path.relative_to(PACKAGE)}:{line}" for path, _ in _modules() if path != home
             for line in _table_rules(path.read_text())]
    assert not found, "markdown tables built by hand (use reporting.markdown.table):\n" + "\n".join(found)
    assert _table_rules('lines = ["| a | b |", "|---|---|"]\n') == [1]
