"""Packages whose names import on first use, so that `import sae_fast` (and `sae-fast
--help`) does not pay for torch until something needs it."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable


def exports(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """A module __getattr__ for package: name -> the attribute of the same name of the
    submodule table[name] (relative, e.g. ".sae"; ".backends:status" names another
    attribute; the submodule itself when it has the name), or the submodule `name` itself,
    imported on first use."""

    def attribute_of(name: str) -> object:
        if name not in table:  # a subpackage, as an eager import would have set it
            if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(f"{package}.{name}")
        where, _, attribute = table[name].partition(":")
        module = importlib.import_module(where, package)
        if name == where.lstrip("."):
            return module
        return getattr(module, attribute or name)

    return attribute_of
