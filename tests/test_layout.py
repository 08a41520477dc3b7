"""The shape of the package, checked: small classes and functions, backend names only in backends/.

The middle layer is where every next feature goes; these limits keep a new backend, metric or task
kind one module (docs/concepts.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "quantgate"
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 150, 60


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _length(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def _too_long(package: Path = PACKAGE):
    out = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and _length(node) > MAX_CLASS_LINES:
                out.append(f"{path.relative_to(package)}: class {node.name} has {_length(node)} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _length(node) > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(package)}: function {node.name} has {_length(node)} lines")
    return out


def test_no_class_over_150_lines_and_no_function_over_60():
    assert _too_long() == []


def _backend_names() -> set[str]:
    from quantgate.backends import registered_backends

    return {b.name for b in registered_backends()}


def test_backend_names_are_compared_only_inside_the_backend_modules():
    names = _backend_names()
    assert {"transformers", "llama.cpp"} <= names
    found = []
    for path in _modules():
        if path.parent.name == "backends":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    if isinstance(side, ast.Constant) and side.value in names:
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} compares with {side.value!r}")
    assert found == []


@pytest.mark.parametrize("offender", ["class", "function"])
def test_the_size_check_sees_an_offender(tmp_path, offender):
    """The check itself works: a long class or function would be named."""
    body = "\n".join(f"    x{i} = {i}" for i in range(200))
    (tmp_path / "big.py").write_text(f"class Big:\n{body}\n" if offender == "class" else f"def big():\n{body}\n")
    assert [line.split(":")[0] for line in _too_long(tmp_path)] == ["big.py"]
