"""Heavy libraries bound at first use. A catalog module that says ``torch = lazy("torch")``
imports torch the first time it reads an attribute of it (inside a function, at run time),
so importing a stage to read its config and plan a run (a fully cached run) never pays for
torch or Ray. Module-level code (class bodies, decorators, constants) must not touch them;
``tests/stages/test_lazy_imports.py`` imports the kinds in a fresh process and checks."""

from __future__ import annotations

import functools
import importlib


class lazy:  # noqa: N801  (reads as the module it stands for)
    __slots__ = ("_name",)

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def no_grad(fn):
    """``@torch.no_grad()`` that imports torch when ``fn`` runs, not when it is defined."""
    @functools.wraps(fn)
    def without_grad(*args, **kwargs):
        import torch
        with torch.no_grad():
            return fn(*args, **kwargs)
    return without_grad
