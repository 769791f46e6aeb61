"""One small registry used by every pluggable kind (rewards, losses, advantages, KL, aggregation).

A YAML node such as ``{name: clipped, eps_low: 0.2}`` names a registered function; its other keys are
the function's hyperparameters. By convention a registered function takes its data (tensors, prompts,
completions) as leading arguments and its hyperparameters as keyword-only parameters with defaults,
so the valid YAML keys are exactly those. (Keyword-only parameters without a default are data too:
a reward's task columns such as ``ground_truth``.) `Registry.resolve` checks the node against the
signature at start-up: an unknown name lists the known names, a misspelled key lists the valid keys.

Adding a piece is one function with ``@REGISTRY.register("name")`` in any module of the kind's
package, plus one YAML file in ``conf/<group>/``: the package's modules are imported on first use, so
no import list needs editing.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from hydra.utils import get_method

from rlx.errors import RlxError


@dataclass(frozen=True)
class Entry:
    """A registered function and what the loops need to know about it."""

    name: str
    fn: Callable[..., Any]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def hyperparameters(self) -> dict[str, Any]:
        """Keyword-only parameters that have defaults: the keys a YAML node may set."""
        sig = inspect.signature(self.fn)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
        }


@dataclass(frozen=True)
class Resolved:
    """A registry lookup bound to its hyperparameters; call it with the data arguments."""

    entry: Entry
    kwargs: Mapping[str, Any]
    extra: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def fn(self) -> Callable[..., Any]:
        return partial(self.entry.fn, **self.kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.entry.fn(*args, **self.kwargs, **kwargs)


class Registry:
    """Maps short stable names (the YAML ``name:``) to functions of one kind."""

    def __init__(self, kind: str, packages: Iterable[str]) -> None:
        self.kind = kind
        self._packages = tuple(packages)
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        self._loaded = False

    def register(
        self, name: str, *, aliases: Iterable[str] = (), **meta: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, dict(meta))
            for alias in aliases:
                self._aliases[alias] = name
            return fn

        return deco

    def _load(self) -> None:
        # Import every module of the kind's packages once, so that a new file with a registered
        # function needs no import list to be edited.
        if self._loaded:
            return
        self._loaded = True
        for pkg_name in self._packages:
            pkg = importlib.import_module(pkg_name)
            for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), prefix=f"{pkg_name}."):
                importlib.import_module(info.name)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        self._load()
        key = self._aliases.get(name, name)
        if key not in self._entries:
            known = ", ".join(self.names())
            raise RlxError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[key]

    def resolve(
        self, node: Mapping[str, Any] | str, *, where: str, reserved: Mapping[str, Any] | None = None
    ) -> Resolved:
        """Bind a config node to its function.

        ``where`` is the config path used in error messages (``algo.loss``). ``reserved`` names keys
        that the node may carry for the loop rather than the function (with their defaults); they are
        returned in ``Resolved.extra``.
        """
        reserved = dict(reserved or {})
        if isinstance(node, str):
            node = {"name": node}
        node = dict(node)
        if "name" not in node or node["name"] is None:
            raise RlxError(f"{where}.name is missing; known {self.kind}s: {', '.join(self.names())}")
        entry = self.get(str(node.pop("name")))
        hparams = entry.hyperparameters()
        extra = {k: node.pop(k, v) for k, v in reserved.items()}
        unknown = sorted(set(node) - set(hparams))
        if unknown:
            valid = ", ".join(sorted([*hparams, *reserved])) or "(none)"
            raise RlxError(
                f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for "
                f"{self.kind} {entry.name!r}; valid keys: {valid}"
            )
        hints = typing.get_type_hints(entry.fn)
        for key, value in node.items():
            check_type(f"{where}.{key}", value, hints.get(key))
        return Resolved(entry, node, extra)


_NUMBER = (int, float)


def check_type(where: str, value: Any, annotation: Any) -> None:
    """Fail with one line when a config value does not fit a parameter's annotation.

    Understands what rlx's signatures use: bool, int, float, str, None and unions of them; anything
    else is accepted as is. YAML integers are accepted where a float is expected.
    """
    if annotation is None or annotation is Any:
        return
    allowed = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None:
        if type(None) in allowed:
            return
        raise RlxError(f"{where} must not be null")
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, _NUMBER) and not isinstance(value, bool):
            return
        if kind is str and isinstance(value, str):
            return
        origin = typing.get_origin(kind) or kind
        if origin in (list, tuple, dict):  # list[list[int]] etc.: the container is checked, not its items
            if isinstance(value, list if origin is tuple else origin):
                return
            continue
        if kind not in (bool, int, float, str, type(None)):
            return  # a type rlx does not check (objects)
    names = " or ".join(getattr(k, "__name__", str(k)).replace("NoneType", "null") for k in allowed)
    raise RlxError(f"{where} must be {names}, got {value!r}")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def instantiate_checked(node: Mapping[str, Any], *, where: str, **data: Any) -> Any:
    """Hydra-style ``_target_`` instantiation with the same start-up key check as the registries.

    ``data`` are arguments the caller supplies (a model builder's ``task``); the node's other keys must
    be parameters of the target. ``name`` is a display key and is not passed on.
    """
    node = dict(node)
    target = node.pop("_target_", None)
    node.pop("name", None)
    if not target:
        raise RlxError(f"{where}._target_ is missing")
    try:
        fn = get_method(str(target))
    except Exception as exc:
        raise RlxError(f"{where}._target_={target!r} cannot be imported: {exc}") from exc
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [p for p in params if p not in data and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(k for k in node if k in data or (k not in params and not takes_any))
    if unknown:
        raise RlxError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid keys: {', '.join(valid)}"
        )
    try:  # the same type check as the registries' (task.length=abc is one line, not a TypeError)
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # a target without resolvable annotations (torch.optim.AdamW): not checked
        hints = {}
    for key, value in node.items():
        check_type(f"{where}.{key}", value, hints.get(key))
    return fn(*data.values(), **node)
