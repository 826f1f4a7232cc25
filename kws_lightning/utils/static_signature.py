"""A `_target_`'s parameters and type hints, read from its source file with `ast`, without importing it.

Why: `kws_lightning.config_check` checks every config node against the callable it builds before training
starts; importing those callables (torch, Lightning) takes seconds, reading their source takes
milliseconds. Anything that cannot be read statically (a C extension, a name made at run time, an unknown
type alias defined elsewhere) is reported as unknown, never guessed: the checker then accepts the value.

`read_signature("torch.optim.SGD")` follows re-exports (``from torch.optim.sgd import SGD as SGD``,
``from torch.nn.modules import *``), a class's ``__init__`` (or its base class's, or a dataclass's fields)
and plain functions. `check_value(hint, value)` answers True / False / None (cannot tell) for plain config
values (int, float, str, bool, None, lists, dicts).
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

# Typing names understood by their last component (typing.Optional, t.Sequence, collections.abc.Mapping).
_SEQUENCES = {"list", "List", "Sequence", "MutableSequence", "Iterable", "Collection", "set", "Set"}
_MAPPINGS = {"dict", "Dict", "Mapping", "MutableMapping"}
_ANYTHING = {"Any", "object", "Callable"}
_MAX_DEPTH = 12  # re-export / base-class hops before giving up


@dataclass(frozen=True)
class Module:
    """A parsed source file and the dotted name it is imported as."""

    name: str
    path: Path
    tree: ast.Module
    is_package: bool


@dataclass(frozen=True)
class Param:
    name: str
    hint: ast.expr | None
    required: bool


@dataclass(frozen=True)
class Signature:
    """The keyword parameters of a callable; `open` when it takes ``**kwargs`` (any key is accepted)."""

    target: str
    params: dict[str, Param]
    open: bool
    module: Module = field(repr=False)


def _module_file(dotted: str) -> tuple[Path, bool] | None:
    """(source file, is a package) of a dotted module name; only the top-level package is looked up by
    `importlib` (which does not execute it), the rest is walked on disk."""
    top, *rest = dotted.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        if spec.origin and spec.origin.endswith(".py"):
            return Path(spec.origin), bool(spec.submodule_search_locations)
        return None
    for location in spec.submodule_search_locations or []:
        base = Path(location).joinpath(*rest)
        if (base / "__init__.py").is_file():
            return base / "__init__.py", True
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py"), False
    return None


@lru_cache(maxsize=256)
def load_module(dotted: str) -> Module | None:
    """Parse a module's source (cached); None when it has no readable ``.py`` file."""
    found = _module_file(dotted)
    if found is None:
        return None
    path, is_package = found
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    return Module(dotted, path, tree, is_package)


def module_exists(dotted: str) -> bool:
    """Whether `dotted` names an installed module (without importing it)."""
    try:
        return importlib.util.find_spec(dotted.split(".")[0]) is not None and _module_file(dotted) is not None
    except (ImportError, ValueError):
        return False


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def find_definition(module: Module, name: str, depth: int = 0) -> tuple[Module, ast.AST] | None:
    """The top-level class / function `name` of `module`, following ``from x import name`` and
    ``from x import *``; None when not found statically."""
    if depth > _MAX_DEPTH:
        return None
    stars = []
    for node in module.tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return module, node
        if isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                if alias.name == "*":
                    stars.append(source)
                elif (alias.asname or alias.name) == name:
                    return _lookup(f"{source}.{alias.name}", depth + 1)
    for source in stars:
        other = load_module(source)
        found = find_definition(other, name, depth + 1) if other else None
        if found:
            return found
    return None


def _lookup(dotted: str, depth: int = 0) -> tuple[Module, ast.AST] | None:
    """A dotted name: a module's top-level definition (``pkg.mod.Name``)."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        return None
    module = load_module(module_name)
    if module is not None:
        return find_definition(module, attr, depth)
    return None


def resolve_name(module: Module, node: ast.expr) -> tuple[Module, ast.AST] | None:
    """The definition a name in `module` refers to (``Foo``, or ``mod.Foo`` after ``import mod``)."""
    if isinstance(node, ast.Name):
        return find_definition(module, node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        for stmt in module.tree.body:
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if (alias.asname or alias.name.split(".")[0]) == node.value.id:
                        prefix = alias.name if alias.asname else node.value.id
                        return _lookup(f"{prefix}.{node.attr}")
    return None


def expand_alias(module: Module, hint: ast.expr | None, depth: int = 0) -> ast.expr | None:
    """A hint naming a module-level type alias (``PadMode = Literal["constant", "reflect"]``, defined in
    `module` or imported into it with ``from x import PadMode``): the aliased expression, so the alias is
    checked like the hint it stands for; any other hint as it is."""
    if not isinstance(hint, ast.Name) or depth > _MAX_DEPTH:
        return hint
    for stmt in module.tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and stmt.targets[0].id == hint.id
            and isinstance(stmt.value, ast.Subscript | ast.BinOp)
        ):
            return stmt.value
        if isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if (alias.asname or alias.name) == hint.id:
                    source = load_module(_absolute(module, stmt))
                    if source is None:
                        return hint
                    expanded = expand_alias(source, ast.Name(id=alias.name), depth + 1)
                    return hint if isinstance(expanded, ast.Name) else expanded
    return hint


def _is_dataclass(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (isinstance(target, ast.Name) and target.id == "dataclass") or (
            isinstance(target, ast.Attribute) and target.attr == "dataclass"
        ):
            return True
    return False


def _dataclass_params(node: ast.ClassDef) -> dict[str, Param]:
    params = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if "ClassVar" in ast.unparse(stmt.annotation):
            continue
        value = stmt.value
        if isinstance(value, ast.Call) and any(k.arg == "init" for k in value.keywords):
            continue  # field(init=False): not a constructor argument
        params[stmt.target.id] = Param(stmt.target.id, stmt.annotation, required=value is None)
    return params


def _function_params(node: ast.FunctionDef | ast.AsyncFunctionDef, skip_first: bool) -> tuple[dict, bool]:
    args = node.args
    positional = list(args.args)[1 if skip_first else 0 :]
    # Defaults align with the last positional arguments.
    first_default = len(positional) - len(args.defaults)
    params = {a.arg: Param(a.arg, a.annotation, required=i < first_default) for i, a in enumerate(positional)}
    for a, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        params[a.arg] = Param(a.arg, a.annotation, required=default is None)
    return params, args.kwarg is not None


def _class_signature(target: str, module: Module, node: ast.ClassDef, depth: int = 0) -> Signature | None:
    for stmt in node.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
            params, open_ = _function_params(stmt, skip_first=True)
            return Signature(target, params, open_, module)
    if _is_dataclass(node):
        return Signature(target, _dataclass_params(node), False, module)
    # No __init__ of its own: the first base class that has one (resolved statically).
    if depth > _MAX_DEPTH:
        return None
    for base in node.bases:
        found = resolve_name(module, base)
        if found and isinstance(found[1], ast.ClassDef):
            signature = _class_signature(target, found[0], found[1], depth + 1)
            if signature is not None:
                return signature
    return None


def signature_of(target: str, module: Module, node: ast.AST) -> Signature | None:
    if isinstance(node, ast.ClassDef):
        return _class_signature(target, module, node)
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        params, open_ = _function_params(node, skip_first=False)
        return Signature(target, params, open_, module)
    return None


def read_signature(target: str) -> Signature | None:
    """The keyword parameters `hydra.utils.instantiate` can pass to `target`; None when unknown."""
    found = _lookup(target)
    return signature_of(target, *found) if found else None


# ---- values against hints -------------------------------------------------------------------------------


def _last_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _any_of(results: list[bool | None]) -> bool | None:
    if any(r is True for r in results):
        return True
    return None if any(r is None for r in results) else False


def _all_of(results: list[bool | None]) -> bool | None:
    if any(r is False for r in results):
        return False
    return None if any(r is None for r in results) else True


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def nested_signature(module: Module, hint: ast.expr) -> Signature | None:
    """A hint naming a dataclass (``time_shift: TimeShift``): its fields, for checking a nested mapping."""
    found = resolve_name(module, hint) if isinstance(hint, ast.Name | ast.Attribute) else None
    if found and isinstance(found[1], ast.ClassDef) and _is_dataclass(found[1]):
        return signature_of(ast.unparse(hint), *found)
    return None


def check_value(hint: ast.expr | None, value: Any) -> bool | None:
    """Whether a plain config value fits a type hint: True, False, or None when the hint is not understood.

    Conservative: an unknown name (a class, a type alias) is None, so it never rejects a valid value. A
    string is not accepted as a sequence (``keywords=yes`` would become ``['y', 'e', 's']``); an int is
    accepted as a float; a bool is never a number.
    """
    if hint is None:
        return None
    if isinstance(hint, ast.Constant):
        if hint.value is None:
            return value is None
        if isinstance(hint.value, str):  # a string annotation ("Trainer", "int | None")
            try:
                return check_value(ast.parse(hint.value, mode="eval").body, value)
            except SyntaxError:
                return None
        return None
    if isinstance(hint, ast.BinOp) and isinstance(hint.op, ast.BitOr):
        return _any_of([check_value(hint.left, value), check_value(hint.right, value)])
    if isinstance(hint, ast.Subscript):
        return _check_subscript(hint, value)
    name = _last_name(hint)
    if name in ("int",):
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "float":
        return _is_number(value)
    if name == "str":
        return isinstance(value, str)
    if name == "bool":
        return isinstance(value, bool)
    if name in _SEQUENCES or name == "tuple" or name == "Tuple":
        return isinstance(value, list | tuple)
    if name in _MAPPINGS:
        return isinstance(value, dict)
    if name in _ANYTHING:
        return True
    return None  # a class or type alias: a nested dataclass is checked key by key by the caller


def _check_subscript(hint: ast.Subscript, value: Any) -> bool | None:
    name = _last_name(hint.value)
    args = list(hint.slice.elts) if isinstance(hint.slice, ast.Tuple) else [hint.slice]
    if name == "Optional":
        return value is None or check_value(args[0], value)
    if name == "Union":
        return _any_of([check_value(a, value) for a in args])
    if name == "Literal":
        allowed = [a.value for a in args if isinstance(a, ast.Constant)]
        return value in allowed if len(allowed) == len(args) else None
    if name in ("Annotated",):
        return check_value(args[0], value)
    if name in ("tuple", "Tuple"):
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
            return _all_of([check_value(args[0], v) for v in value])
        if len(value) != len(args):
            return False
        return _all_of([check_value(a, v) for a, v in zip(args, value, strict=True)])
    if name in _SEQUENCES:
        if not isinstance(value, list | tuple):
            return False
        return _all_of([check_value(args[0], v) for v in value])
    if name in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        if len(args) != 2:
            return True
        return _all_of(
            [check_value(args[0], k) for k in value] + [check_value(args[1], v) for v in value.values()]
        )
    if name in _ANYTHING:
        return True
    return None


def allowed_values(hint: ast.expr | None) -> list[Any] | None:
    """The values of a ``Literal[...]`` hint (also inside Optional / Union / ``|``); None otherwise."""
    if hint is None:
        return None
    if isinstance(hint, ast.BinOp) and isinstance(hint.op, ast.BitOr):
        left, right = allowed_values(hint.left), allowed_values(hint.right)
        return (left or []) + (right or []) if left or right else None
    if isinstance(hint, ast.Subscript):
        name = _last_name(hint.value)
        args = list(hint.slice.elts) if isinstance(hint.slice, ast.Tuple) else [hint.slice]
        if name == "Literal":
            return [a.value for a in args if isinstance(a, ast.Constant)]
        if name in ("Optional", "Union"):
            found = [v for a in args for v in (allowed_values(a) or [])]
            return found or None
    return None
