"""Functions stay short enough to read in one screen: none over 60 lines in the core, the
boards, replication and the command line unless its docstring says why (a paragraph
starting with "Long because").  Complexity is ruff's C901 (max 15, pyproject.toml); this
checks length, which ruff does not.  Checked from the source with ast, nothing is imported.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKED = ["emu", "machines", "colo", "frontend"]
MAX_LINES = 60
REASON = "Long because"


def _long_functions():
    for layer in CHECKED:
        for path in sorted((ROOT / layer).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), relative)):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and REASON not in (ast.get_docstring(node) or ""):
                    yield f"{relative}:{node.lineno} {node.name} ({lines} lines)"


def test_no_function_is_longer_than_60_lines_without_a_reason():
    assert list(_long_functions()) == []
