"""
The session listing of a Maildir (RFC 1939: message numbers, sizes and
UIDLs fixed for the session), kept compact: an idle logged-in connection
costs its listing, so a listing is not a list of objects per message but
one string of UIDLs and file names, its offsets and the sizes in machine
arrays.  The L{MessageInfo}s a session asks for are made on first use, once
per listing.

A L{Listing} is never modified once made: the store's warm-login cache
(L{popservice.stores.maildir.cache}) and every session of the Maildir share
the same object.  It may carry a I{state} (L{Listing.state}): what the
Maildir looked like on disk when it was made, so that a later login can
tell with a few C{stat} calls that it still holds
(L{popservice.stores.maildir.freshness}).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import overload

from popservice.interfaces import MessageInfo

__all__ = ["Listing"]


class Listing(Sequence[MessageInfo]):
    """
    A Maildir listing, oldest first: per message its file (its name in
    C{cur/}, else C{"new/<name>"}, see L{popservice.stores.maildir.layout._relpath}),
    its transmitted size and its UIDL.

    Two objects hold it all: one string, the UIDLs then the files; and one
    array of numbers, the sizes then the offsets that cut the string.
    """

    __slots__ = ("_text", "_numbers", "_infos", "state", "path")

    _text: str
    #: n sizes, then the 2n + 1 offsets of the n UIDLs and n files in C{_text}
    _numbers: array[int]
    _infos: list[MessageInfo] | None
    #: the stat stamp of cur/, new/ and the index this listing follows from (and, once a store
    #: keeps it, of the Maildir when its mail-root check passed), or C{None} (unsure)
    state: bytes | None
    #: the Maildir's path, as the cache that keeps the listing has it (one string for all its sessions)
    path: str | None

    def __init__(self, files: Sequence[str], sizes: Sequence[int], uids: Sequence[str]) -> None:
        if not len(files) == len(sizes) == len(uids):
            raise ValueError("files, sizes and uids must be parallel")
        items = [*uids, *files]
        self._text = "".join(items)
        if len(self._text) >= 1 << 32:
            raise ValueError("listing too long")
        small = not sizes or (min(sizes) >= 0 and max(sizes) < 1 << 32)
        # (made whole: an array grown by extend keeps room to grow, per listing)
        self._numbers = array("I" if small else "q", [*sizes, *accumulate(map(len, items), initial=0)])
        self._infos = None
        self.state = None
        self.path = None

    def with_files(self, files: Sequence[str]) -> Listing:
        """The same messages, found under these (renamed) files."""
        if len(files) != len(self):
            raise ValueError("one file per message")
        new = Listing(files, self.sizes(), self.uids())
        new._infos = self._infos
        return new

    def subset(self, keep: Sequence[int]) -> Listing:
        """The messages at positions C{keep}, in that order."""
        return Listing([self.file(i) for i in keep], [self.size(i) for i in keep],
                       [self.uid(i) for i in keep])

    def __len__(self) -> int:
        return len(self._numbers) // 3  # 3n + 1 numbers

    def _cut(self, index: int) -> str:
        """The UIDL (C{index} < n) or file (n <= C{index} < 2n) at position C{index} of the string."""
        numbers = self._numbers
        start = len(numbers) // 3 + index
        return self._text[numbers[start]:numbers[start + 1]]

    def file(self, index: int) -> str:
        """Where message C{index} (0-based) was found."""
        count = len(self._numbers) // 3
        if not 0 <= index < count:
            raise IndexError(index)
        return self._cut(count + index)

    def files(self) -> list[str]:
        return [self.file(i) for i in range(len(self))]

    def size(self, index: int) -> int:
        count = len(self._numbers) // 3
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(index)
        return self._numbers[index]

    def sizes(self) -> list[int]:
        return self._numbers[:len(self._numbers) // 3].tolist()

    def uid(self, index: int) -> str:
        if not 0 <= index < len(self._numbers) // 3:
            raise IndexError(index)
        return self._cut(index)

    def uids(self) -> list[str]:
        return [self.uid(i) for i in range(len(self))]

    def _all(self) -> list[MessageInfo]:
        infos = self._infos
        if infos is None:
            infos = self._infos = list(map(MessageInfo, self.sizes(), self.uids()))
        return infos

    @overload
    def __getitem__(self, index: int) -> MessageInfo: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[MessageInfo]: ...

    def __getitem__(self, index: int | slice) -> MessageInfo | Sequence[MessageInfo]:
        return self._all()[index]

    def __iter__(self) -> Iterator[MessageInfo]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Listing):
            return self.sizes() == other.sizes() and self.uids() == other.uids()
        if isinstance(other, (list, tuple)):
            return self._all() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Listing of {len(self)} messages>"
