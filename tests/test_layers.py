"""The layout's rules, read from the source (ast): which packages may import which, and how long a function may be.

Packages, lowest first: ``common/`` (helpers), ``data/``, ``thresholds/``, ``stages/``, ``storage/``, ``outputs/``
(what the models and their results are made of), then ``inference/`` and ``training/`` (what runs and tunes a
model), then ``apps/`` and ``cli/``. A package imports nothing from a higher layer, except under ``if TYPE_CHECKING``
(annotations only: ``outputs/`` names ``cascade.inference.pipeline.Prediction``). Only ``cli/`` (and
``__main__``) import the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cascade"
ALLOWED = ("cli",)
LOWER = ("common", "data", "thresholds", "stages", "storage", "outputs", "configs")
"""Packages that import nothing from ``inference/``, ``training/``, ``apps/`` or ``cli/``."""
MIDDLE = ("inference", "training")
"""Packages that import nothing from ``apps/`` or ``cli/``."""
MAX_LINES = 60
"""A function's own lines: its docstring and the functions and classes nested in it (measured on their own) left out."""
LONG_FUNCTIONS = {
    # One document each, written top to bottom in the order it reads; split, its sections would only be scattered.
    "apps/demo.py:write_report": "the demo's report.md, section after section",
    "storage/model_card.py:render": "the model card's Markdown, section after section",
    "outputs/dicom_sr.py:report": "the SR's content tree in document order (TID 1500 containers and items)",
}
"""Functions allowed over :data:`MAX_LINES` (outside ``cli/``), each with its reason."""


def _modules() -> list[tuple[Path, str]]:
    """Every module of the package with its first-level package (``(root)`` for cascade/*.py)."""
    return [
        (path, path.relative_to(PACKAGE).parts[0] if len(path.relative_to(PACKAGE).parts) > 1 else "(root)")
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _type_checking_nodes(tree: ast.AST) -> set[ast.AST]:
    """The import statements under ``if TYPE_CHECKING:``."""
    nodes: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            nodes |= {child for stmt in node.body for child in ast.walk(stmt)}
    return nodes


def _imports(path: Path, *, runtime_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree) if runtime_only else set()
    names = []
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def _imports_any(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == f"cascade.{p}" or name.startswith(f"cascade.{p}.") for p in packages)


def test_no_library_module_imports_the_command_line() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path, package in _modules()
        if package not in ALLOWED and path.name != "__main__.py"
        for name in _imports(path)
        if _imports_any(name, ("cli",))
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "packages, above",
    [(LOWER, ("inference", "training", "apps", "cli")), (MIDDLE, ("apps", "cli"))],
    ids=["lower", "middle"],
)
def test_no_package_imports_a_higher_layer(packages: tuple[str, ...], above: tuple[str, ...]) -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path, package in _modules()
        if package in packages
        for name in _imports(path, runtime_only=True)
        if _imports_any(name, above)
    ]
    assert not offenders, offenders


def _own_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = set(range(function.lineno, function.end_lineno + 1))
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    for node in ast.walk(function):
        if node is not function and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            lines -= set(range(first, node.end_lineno + 1))
    return len(lines)


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [(f"{prefix}{node.name}", node), *_functions(node, f"{prefix}{node.name}.")]
        elif isinstance(node, ast.ClassDef):
            found += _functions(node, f"{prefix}{node.name}.")
        else:
            found += _functions(node, prefix)
    return found


def test_no_function_outside_the_command_line_is_long() -> None:
    long = {
        f"{path.relative_to(PACKAGE).as_posix()}:{name}": _own_lines(function)
        for path, package in _modules()
        if package not in ALLOWED
        for name, function in _functions(ast.parse(path.read_text(encoding="utf-8")))
        if _own_lines(function) > MAX_LINES
    }
    assert not set(long) - set(LONG_FUNCTIONS), {k: v for k, v in long.items() if k not in LONG_FUNCTIONS}
    assert not set(LONG_FUNCTIONS) - set(long), f"no longer long: drop {set(LONG_FUNCTIONS) - set(long)}"
