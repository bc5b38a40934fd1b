"""
What the Twisted client's commands answer with: L{Capabilities} (a parsed
CAPA, RFC 2449 section 6), and the L{ListEntry} and L{UidlEntry} rows of
LIST and UIDL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

__all__ = ["Capabilities", "ListEntry", "UidlEntry"]


@dataclass(frozen=True)
class Capabilities:
    """A parsed CAPA answer (RFC 2449 section 6)."""

    #: tag (upper case) -> its arguments, in server order
    tags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lines: tuple[str, ...] = ()

    @classmethod
    def parse(cls, lines: Sequence[bytes]) -> "Capabilities":
        tags: dict[str, tuple[str, ...]] = {}
        text = []
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            text.append(line)
            if line.upper().startswith("IMPLEMENTATION"):
                tags["IMPLEMENTATION"] = (line[len("IMPLEMENTATION"):].strip(),)
                continue
            words = line.split()
            tags[words[0].upper()] = tuple(words[1:])
        return cls(tags, tuple(text))

    def __contains__(self, tag: object) -> bool:
        return isinstance(tag, str) and tag.upper() in self.tags

    @property
    def sasl(self) -> tuple[str, ...]:
        return tuple(m.upper() for m in self.tags.get("SASL", ()))

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.tags

    @property
    def stls(self) -> bool:
        return "STLS" in self.tags

    @property
    def user(self) -> bool:
        return "USER" in self.tags

    @property
    def utf8(self) -> bool:
        """RFC 6856: the UTF8 command is available (before login)."""
        return "UTF8" in self.tags

    @property
    def utf8_user(self) -> bool:
        """RFC 6856 C{UTF8 USER}: UTF-8 user names and passwords in USER/PASS too."""
        return "USER" in (a.upper() for a in self.tags.get("UTF8", ()))

    @property
    def uidl(self) -> bool:
        return "UIDL" in self.tags

    @property
    def top(self) -> bool:
        return "TOP" in self.tags

    @property
    def resp_codes(self) -> bool:
        return "RESP-CODES" in self.tags

    @property
    def implementation(self) -> str | None:
        v = self.tags.get("IMPLEMENTATION")
        return v[0] if v else None

    def _seconds(self, tag: str) -> Union[int, str, None]:
        v = self.tags.get(tag)
        if not v:
            return None
        if v[0].upper() == "NEVER":
            return "NEVER"
        try:
            return int(v[0])
        except ValueError:
            return None

    @property
    def login_delay(self) -> int | None:
        """Seconds between logins (RFC 2449 6.5), C{None} when not announced."""
        v = self._seconds("LOGIN-DELAY")
        return v if isinstance(v, int) else None

    @property
    def expire(self) -> Union[int, str, None]:
        """Days messages are kept (RFC 2449 6.7): an int, C{"NEVER"} or C{None}."""
        return self._seconds("EXPIRE")


@dataclass(frozen=True)
class ListEntry:
    number: int
    size: int


@dataclass(frozen=True)
class UidlEntry:
    number: int
    uid: str

