"""One small registry used for models, datasets, schemes, inits and scorers.

Adding a thing is one decorated function (as timm does for models); lookups of a
mistyped name fail with a did-you-mean instead of a bare KeyError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from slt.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind. With an entry-point group, objects that other
    installed packages declare there join the first time the registry is read."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._group = entry_point_group
        self._loaded = entry_point_group is None
        self.origins: dict[str, str] = {}  # name -> distribution, for plug-ins
        self.broken: dict[str, str] = {}  # plug-in name -> why it did not load

    def _load_entry_points(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self._group):
            if ep.name in self._items:
                self.broken[f"{ep.name} ({ep.value})"] = "the name is taken by a built-in one"
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not break the others
                self.broken[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            if ep.name not in self._items:  # the module may register itself on import
                self._items[ep.name] = obj
            self.origins[ep.name] = ep.dist.name if ep.dist else ep.value

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_entry_points()
        if name in self.broken:
            raise ConfigError(f"{self.kind} '{name}' is installed but failed to load: "
                              f"{self.broken[name]}")
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; "
                f"known: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
