"""The hand-written stub `_core.pyi` and the compiled module must describe the same surface.

A dependency-free cousin of `mypy.stubtest`: every public class, function and constant in the stub
exists in the module with the same kind, every public method or attribute a stub class declares
exists on the compiled class, the module exports nothing the stub leaves out, and every function,
method and constructor has the same parameters (names, order, kinds, defaults) in both.
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


# -- signatures -----------------------------------------------------------------------------------
# PyO3 gives every function and method a ``__text_signature__``, so ``inspect.signature`` reads the
# compiled parameters. The stub must agree on each parameter's name, order and kind (positional
# or keyword-only, *args, **kwargs) and on its default: a literal default must be equal, and
# ``...`` in the stub stands for "has a default" (for defaults a stub cannot spell).

_NO_DEFAULT = object()


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, str, object]]:
    a = fn.args
    out: list[tuple[str, str, object]] = []
    positional = a.posonlyargs + a.args
    defaults = [_NO_DEFAULT] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for arg, default in zip(positional, defaults):
        out.append((arg.arg, "positional", default))
    if a.vararg:
        out.append((a.vararg.arg, "*args", _NO_DEFAULT))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "keyword", _NO_DEFAULT if default is None else default))
    if a.kwarg:
        out.append((a.kwarg.arg, "**kwargs", _NO_DEFAULT))
    if out and out[0][0] in ("self", "cls"):
        out = out[1:]
    return out


_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def _runtime_params(obj: object) -> list[tuple[str, str, object]]:
    params = list(inspect.signature(obj).parameters.values())  # type: ignore[arg-type]
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [
        (p.name, _KINDS[p.kind], _NO_DEFAULT if p.default is inspect.Parameter.empty else p.default)
        for p in params
    ]


def _signature_problems(where: str, stub: ast.FunctionDef, runtime: object) -> list[str]:
    try:
        actual = _runtime_params(runtime)
    except (TypeError, ValueError):
        return []  # no text signature at runtime (e.g. an exception type): nothing to compare
    declared = _stub_params(stub)
    shape = [(n, k) for n, k, _ in declared]
    if shape != [(n, k) for n, k, _ in actual]:
        return [f"{where}: stub {shape} vs compiled {[(n, k) for n, k, _ in actual]}"]
    problems = []
    for (name, _, node), (_, _, value) in zip(declared, actual):
        if (node is _NO_DEFAULT) != (value is _NO_DEFAULT):
            problems.append(f"{where}({name}): default in one and not the other")
        elif node is not _NO_DEFAULT:
            assert isinstance(node, ast.expr)
            literal = ast.literal_eval(node) if not isinstance(node, ast.Constant) else node.value
            if literal is not Ellipsis and value is not Ellipsis and literal != value:
                problems.append(f"{where}({name}): stub default {literal!r} vs compiled {value!r}")
    return problems


def test_stub_signatures_match_the_compiled_module() -> None:
    members = _stub_members(_stub_tree())
    problems: list[str] = []
    checked = 0
    for name, node in members.items():
        if name in TYPING_ONLY or not hasattr(_core, name):
            continue
        runtime = getattr(_core, name)
        if isinstance(node, ast.FunctionDef):
            problems += _signature_problems(name, node, runtime)
            checked += 1
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if not isinstance(item, ast.FunctionDef):
                    continue
                if item.name in ("__init__", "__new__"):
                    problems += _signature_problems(f"{name}()", item, runtime)
                elif not item.name.startswith("_") and callable(getattr(runtime, item.name, None)):
                    if any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                        continue
                    problems += _signature_problems(f"{name}.{item.name}", item, getattr(runtime, item.name))
                else:
                    continue
                checked += 1
    assert checked > 30, f"only {checked} signatures compared: is the stub parsed?"
    assert problems == [], "stub and compiled signatures differ:\n" + "\n".join(problems)
