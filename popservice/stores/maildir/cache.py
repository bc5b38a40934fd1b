"""
The per-process listing cache: a warm login of a big Maildir whose files
still match its C{popservice-uidlist} takes the session listing (RFC 1939
message numbers, sizes and UIDLs) from memory, keyed by the index file's
exact content, so it is never stale whoever wrote the file.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from popservice.interfaces import MessageInfo

__all__ = ["LISTING_CACHE_MESSAGES", "LISTING_CACHE_MINIMUM"]


class _ListingCache:
    """
    The listing last made from an index, per Maildir, for the life of the
    process: a warm login of a big Maildir whose files still match the index
    then neither parses the index nor makes its L{MessageInfo}s again.

    An entry is used only when the index file's whole content equals the one
    it was made from (so it is never stale, whoever wrote the file) and when
    the Maildir holds exactly its messages.  Only Maildirs of at least
    C{minimum} messages are kept, C{budget} messages in all (about 300 bytes
    each), the least recently used dropped first.
    """

    def __init__(self, budget: int, minimum: int) -> None:
        self.budget = budget
        self.minimum = minimum
        self._entries: OrderedDict[str, tuple[bytes, list[str], list[MessageInfo]]] = OrderedDict()
        self._messages = 0
        self._lock = threading.Lock()

    def get(self, path: str, raw: bytes) -> tuple[list[str], list[MessageInfo]] | None:
        """(base names, infos) made from index content C{raw} of C{path}, if kept."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return None
            if entry[0] != raw:
                del self._entries[path]
                self._messages -= len(entry[1])
                return None
            self._entries.move_to_end(path)
            return entry[1], entry[2]

    def put(self, path: str, raw: bytes, bases: list[str], infos: list[MessageInfo]) -> None:
        """Keep the listing (never modified afterwards) made from index content C{raw}."""
        if not self.minimum <= len(bases) <= self.budget:
            return
        with self._lock:
            old = self._entries.pop(path, None)
            if old is not None:
                self._messages -= len(old[1])
            self._entries[path] = (raw, bases, infos)
            self._messages += len(bases)
            while self._messages > self.budget:
                _, dropped = self._entries.popitem(last=False)
                self._messages -= len(dropped[1])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._messages = 0


#: Messages kept in L{_ListingCache} (about 300 bytes each, so some 15 MB).
LISTING_CACHE_MESSAGES = 50_000
#: Smaller Maildirs are scanned fast enough without it.
LISTING_CACHE_MINIMUM = 1_000
_listing_cache = _ListingCache(LISTING_CACHE_MESSAGES, LISTING_CACHE_MINIMUM)


def _clear_index_cache() -> None:
    """Forget every cached listing (tests, benchmarks)."""
    _listing_cache.clear()
