"""A module imported on first use, so kernels and the Jupyter server load no torch until
work runs."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """Stands in for ``name`` until an attribute is asked for; then imports it.

    After the import the module's names are copied onto this object, so later lookups cost
    what a plain module attribute costs.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)
