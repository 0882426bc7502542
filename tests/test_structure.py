"""The package's shape, checked: sizes, imports, comments, kernel differences chosen once.

These are the structural rules of README's design notes, held by CI rather than by review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pkvm"
FILES = sorted(SRC.rglob("*.py"))
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def _rel(path: Path) -> str:
    return str(path.relative_to(SRC.parent))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_the_package_has_sources() -> None:
    assert len(FILES) > 50


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_no_source_file_is_longer_than_600_lines(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_FILE_LINES, f"{_rel(path)} has {n} lines"


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_no_function_is_longer_than_80_lines(path: Path) -> None:
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{_rel(path)}: {long}"


_ISSUE_CITE = re.compile(r"\bissues?\s*#?\d+\b", re.IGNORECASE)


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_no_comment_cites_an_issue_number(path: Path) -> None:
    """A reader of the code cannot follow "issue 9": comments explain the code itself."""
    hits = [
        f"line {i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if _ISSUE_CITE.search(line)
    ]
    assert not hits, f"{_rel(path)}: {hits}"


_IMPORT_BLOCK = re.compile(r"^(from |import |\)$|[A-Za-z_][A-Za-z_0-9]*( as [A-Za-z_0-9]+)?,$)")


def _said_why(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or above the block of imports it belongs to."""
    if "#" in lines[lineno - 1]:
        return True
    for line in reversed(lines[: lineno - 1]):
        text = line.strip()
        if text.startswith("#"):
            return True
        if not _IMPORT_BLOCK.match(text):
            return False
        if "#" in text:  # a comment on an import of the same block
            return True
    return False


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_imports_inside_functions_say_why(path: Path) -> None:
    """Imports sit at module top unless one breaks a cycle (or defers a heavy module) on purpose,
    and a comment says so: on the import, above its block, or (for a module that defers the
    imports of single commands) once in the module's docstring ("imported inside" / "imported
    by the functions that use")."""
    text = path.read_text()
    tree = _tree(path)
    doc = ast.get_docstring(tree) or ""
    if re.search(r"imported (inside|by the (functions|commands))", " ".join(doc.split())):
        return
    lines = text.splitlines()
    silent = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import | ast.ImportFrom) and not _said_why(lines, inner.lineno):
                silent.append(f"line {inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not silent, f"{_rel(path)}: {sorted(set(silent))}"


_VERSION_TEST = re.compile(r"""\.name\s*[!=]=\s*["'](6\.12|7\.2|latest)["']""")


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_no_kernel_version_test_at_a_use(path: Path) -> None:
    """A difference between the kernels is a named profile field or a per-kernel module; no code
    asks which kernel it runs on by name."""
    hits = [
        f"line {i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if _VERSION_TEST.search(line)
    ]
    assert not hits, f"{_rel(path)}: {hits}"
