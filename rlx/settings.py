"""Settings written once: a dataclass per config section whose fields are the YAML keys.

A field's annotation is its type, checked with the same `check_type` that checks registry
signatures; its default lives in the YAML (a field may carry a code default only where the YAML
has the same one: ``tests/test_settings.py`` compares them). A key the dataclass does not have is
refused with the list of valid keys, so ``+trainer.foo=1`` cannot slip through.

Range rules go in the dataclass's ``check`` method, next to the fields they constrain.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from rlx.errors import RlxError
from rlx.registry import check_type

T = TypeVar("T")

RENAMED = {
    "algo.kl_target": "kl.adaptive_target",
    "algo.kl_horizon": "kl.adaptive_horizon",
    "algo.target_kl": "algo.early_stop_kl",
}


def renamed_key_message(key: str) -> str | None:
    """One line for a key that was renamed, naming the new one; None for any other key."""
    new = RENAMED.get(key.lstrip("+~"))
    if new is None:
        return None
    extra = " (with kl.adaptive_horizon)" if new == "kl.adaptive_target" else ""
    return f"{key.lstrip('+~')} was renamed: use {new}{extra}"


def read_settings(
    cls: type[T], node: Mapping[str, Any] | None, *, where: str, ignore: tuple[str, ...] = ()
) -> T:
    """``cls`` built from the config section ``node`` (at config path ``where``), every value checked.

    Keys in ``ignore`` belong to another reader of the same section and are skipped.
    """
    node = dict(node or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in node:
        message = renamed_key_message(f"{where}.{key}")
        if message:
            raise RlxError(message)
    unknown = sorted(k for k in node if k not in fields and k not in ignore)
    if unknown:
        raise RlxError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in node:
            value = node[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise RlxError(f"{where}.{name} is missing")
        kind = hints.get(name)
        check_type(f"{where}.{name}", value, kind)
        if isinstance(value, int) and not isinstance(value, bool) and _wants_float(kind):
            value = float(value)  # YAML's 1 for a float setting
        values[name] = value
    settings = cls(**values)
    check = getattr(settings, "check", None)
    if check is not None:
        check()
    return settings


def _wants_float(kind: Any) -> bool:
    if kind is float:
        return True
    return float in typing.get_args(kind) and int not in typing.get_args(kind)
