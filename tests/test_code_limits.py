"""Limits that keep a function readable in one sitting, checked from the source (ast).

ruff checks the cyclomatic complexity (C90, at most 15: ``pyproject.toml``); this checks
the length: a function of more than 60 lines must say why in its docstring (a sentence
starting "Long because").
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 60
#: the code under the limit (the rest of the tree follows as it is reworked)
CHECKED = ["colo", "frontend/colo.py"]


def _files():
    for entry in CHECKED:
        path = ROOT / entry
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _long_functions(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() has {lines} lines"


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_a_screen_without_saying_why(path):
    too_long = list(_long_functions(path))
    assert not too_long, "\n".join(too_long)
