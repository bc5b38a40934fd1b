"""
Small immutable records without C{dataclasses} or C{typing}: the fetch
client's start-up pays for every import (about 13 ms for dataclasses and 4 ms
for typing on the machine that measured it, a fifth of a whole fetch's own
start-up), and these few records are all the fetch path would use them for.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    _V = TypeVar("_V", bound="Value")

__all__ = ["Value"]


class Value:
    """
    A record whose fields are the names in C{__slots__}, set once in the
    subclass's C{__init__} (declare them C{Final} so mypy keeps them so);
    equality, hashing, C{repr} and C{_replace} follow from the slots.
    """

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Value) and type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def _replace(self: _V, **changes: Any) -> _V:
        """A copy with some fields changed (as C{NamedTuple._replace})."""
        unknown = set(changes) - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        clone = object.__new__(type(self))
        for name in self.__slots__:
            object.__setattr__(clone, name, changes.get(name, getattr(self, name)))
        return clone
