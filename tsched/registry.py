"""Name -> function tables: schedule profiles, credit criteria, advantage estimators and verifiers are
each one registered function, so adding one is one function (plus its test)."""

from __future__ import annotations

from typing import Callable


def make_registry() -> tuple[dict[str, Callable], Callable]:
    """-> (table, register) where `@register("name")` adds a function to `table`."""
    table: dict[str, Callable] = {}

    def register(name: str):
        def deco(fn):
            table[name] = fn
            return fn
        return deco

    return table, register
