"""The shape rules of labq's own code (issue 7): no branching function over 60 lines or
above cyclomatic complexity 15, no class over 300 lines. Checked on every module of the
services, the client and the benchmarks, so a change that grows a piece past them fails
here and names it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO
from radon.complexity import cc_visit

FOLDERS = ("backend", "shared", "producer", "consumer", "process_unit", "client", "bench")
MAX_COMPLEXITY = 15
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300
BRANCHES = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With, ast.AsyncWith,
            ast.Match, ast.IfExp, ast.comprehension)


def modules() -> list[Path]:
    found = []
    for folder in FOLDERS:
        found += [p for p in sorted((REPO / folder).rglob("*.py"))
                  if "migrations/versions" not in p.as_posix()]
    return found


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno} {getattr(node, 'name', '')}"


def test_the_rules_see_every_module():
    assert len(modules()) > 50  # the folders moved: the rules would pass on nothing


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_functions_and_classes_keep_their_size(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    too_big = []
    for node in ast.walk(tree):
        lines = (node.end_lineno or node.lineno) - node.lineno + 1 \
            if hasattr(node, "lineno") else 0
        if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
            too_big.append(f"class {where(path, node)}: {lines} lines")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                lines > MAX_FUNCTION_LINES and \
                any(isinstance(inner, BRANCHES) for inner in ast.walk(node)):
            too_big.append(f"function {where(path, node)}: {lines} lines")
    # radon lists functions, classes and (again, on their own) methods: each block once.
    complex_ = [f"{path.relative_to(REPO)}:{block.lineno} {block.fullname}: "
                f"complexity {block.complexity}"
                for block in cc_visit(path.read_text())
                if block.complexity > MAX_COMPLEXITY and not hasattr(block, "methods")]
    assert not too_big + complex_, "split these:\n" + "\n".join(sorted(set(too_big + complex_)))
