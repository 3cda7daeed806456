"""Named registries: one place per axis of the grid where a method declares itself.

A registry maps a name (what the YAML writes) to the object that implements it. Built-in
methods register when their module is imported; a researcher's own method is a module that
registers the same way, named in the experiment's `plugins:` list (`load_plugins`), so adding
one touches no file of this package.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to implementations, in registration order (the order reports list them in)."""

    def __init__(self, what: str):
        self.what = what  # "intervention kind", "direction method": for messages
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@INTERVENTIONS.register("addition")`. A name is registered once."""
        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._items[name] = item
            return item
        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r} (known: {', '.join(self._items)})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()

    def module_of(self, name: str) -> str:
        """The module that registered `name`: one of this package's, or a plugin's (`plugin_module`)."""
        item = self.get(name)
        return getattr(item, "__module__", type(item).__module__)


def plugin_module(entry: str) -> str:
    """The module name a plugin entry is imported as: a file gets a name of its own, a module keeps its."""
    if not entry.endswith(".py"):
        return entry
    path = Path(entry).resolve()
    return f"refusal_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def plugins_providing(registry: Registry, names, plugins) -> list[str]:
    """The entries of `plugins` that registered any of `names` in `registry`: what a job running those
    methods must load, and no more (so adding an unused plugin changes no job's params)."""
    modules = {registry.module_of(n) for n in names}
    return [entry for entry in plugins if plugin_module(entry) in modules]


def load_plugins(entries: list[str] | tuple[str, ...], base: Path | str = ".") -> None:
    """Import each plugin: a module name (`mylab.kernels`) or a Python file (`plugins/scale.py`, relative
    to `base`). Importing it is what registers its methods; a plugin already imported is not re-run."""
    for entry in entries:
        if entry.endswith(".py"):
            path = (Path(base) / entry).resolve()
            name = plugin_module(str(path))
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or not path.is_file():
                raise FileNotFoundError(f"plugin file {path} does not exist")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            importlib.import_module(entry)
