"""A module imported on first attribute access: keeps heavy imports off start-up."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule(ModuleType):
    def __getattr__(self, name: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        return getattr(module, name)


def lazy_module(name: str) -> Any:
    """A stand-in for `import name` that imports the module when first used."""
    return _LazyModule(name)
