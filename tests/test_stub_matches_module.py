"""The hand-written stub `_core.pyi` and the compiled module must describe the same surface.

A cheap, dependency-free cousin of `mypy.stubtest`: every public class, function and constant in
the stub exists in the module with the same kind, every public method or attribute a stub class
declares exists on the compiled class, and the module exports nothing the stub leaves out.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import membuilder
import pytest
from membuilder import _core

STUB = Path(membuilder.__file__).with_name("_core.pyi")
# Names that only exist for typing (aliases, the shared protocol class) and are not runtime objects.
TYPING_ONLY = {"Agent", "BankKind", "UpdateMode", "_Store"}


def _stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text(encoding="utf-8"))


def _stub_members(tree: ast.Module) -> dict[str, ast.stmt]:
    out: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node
    return out


def _class_members(cls: ast.ClassDef, classes: dict[str, ast.stmt]) -> set[str]:
    names: set[str] = set()
    for base in cls.bases:
        if isinstance(base, ast.Name) and isinstance(classes.get(base.id), ast.ClassDef):
            names |= _class_members(classes[base.id], classes)  # type: ignore[arg-type]
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and not (
            node.name.startswith("__") and node.name not in {"__len__", "__init__"}
        ):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    names.discard("__init__")
    return names


def test_every_stub_name_exists_in_the_module() -> None:
    members = _stub_members(_stub_tree())
    missing = [n for n in members if n not in TYPING_ONLY and not hasattr(_core, n)]
    assert missing == [], f"declared in _core.pyi but missing from the compiled module: {missing}"


def test_module_exports_nothing_the_stub_omits() -> None:
    members = _stub_members(_stub_tree())
    public = {n for n in dir(_core) if not n.startswith("_")}
    extra = sorted(public - set(members))
    assert extra == [], f"exported by the compiled module but not declared in _core.pyi: {extra}"


@pytest.mark.parametrize(
    "name",
    [
        n
        for n, node in _stub_members(_stub_tree()).items()
        if isinstance(node, ast.ClassDef) and n not in TYPING_ONLY
    ],
)
def test_stub_class_members_exist(name: str) -> None:
    members = _stub_members(_stub_tree())
    cls_node = members[name]
    assert isinstance(cls_node, ast.ClassDef)
    runtime = getattr(_core, name)
    assert inspect.isclass(runtime), f"{name} is a class in the stub but {type(runtime)} at runtime"
    if issubclass(runtime, BaseException):
        return  # exception attributes (path, problem) are set per instance
    missing = sorted(m for m in _class_members(cls_node, members) if not hasattr(runtime, m))
    assert missing == [], f"{name}: declared in the stub but missing at runtime: {missing}"


@pytest.mark.parametrize(
    "name",
    [n for n, node in _stub_members(_stub_tree()).items() if isinstance(node, ast.FunctionDef)],
)
def test_stub_functions_are_callable(name: str) -> None:
    assert callable(getattr(_core, name))
