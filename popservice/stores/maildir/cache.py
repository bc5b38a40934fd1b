"""
Listings kept in memory between logins:

 - L{WarmListings}, a store's own: the last listing of each Maildir, with the
   state it was made from (L{popservice.stores.maildir.freshness}).  A login
   whose Maildir still has that state takes it without a scan, on the
   reactor thread, and shares it with the other sessions (and the cache).
 - L{_ListingCache}, per process: a login of a big Maildir whose files
   still match its C{popservice-uidlist} (a flag changed by another client,
   say) takes the sizes and UIDLs from memory, keyed by the index file's
   exact content, so it is never stale whoever wrote the file.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from popservice.interfaces import MessageInfo
from popservice.stores.maildir.listing import Listing

__all__ = ["LISTING_CACHE_MESSAGES", "LISTING_CACHE_MINIMUM", "WarmListings"]


class WarmListings:
    """
    The last listing of each Maildir a store opened, least recently used
    dropped first beyond C{budget} messages in all or C{entries} Maildirs.
    Used on the reactor thread only.  Its listings are shared with the
    sessions (never copied), so a Maildir in use costs nothing more here
    than its entry in a plain dictionary (kept in use order).
    """

    __slots__ = ("budget", "entries", "_listings", "_messages")

    def __init__(self, budget: int = 100_000, entries: int = 20_000) -> None:
        self.budget = budget
        self.entries = entries
        self._listings: dict[str, Listing] = {}
        self._messages = 0

    def get(self, path: str) -> tuple[str, Listing] | None:
        """(the key, equal to C{path}: one string per Maildir, shared), the listing."""
        listings = self._listings
        listing = listings.pop(path, None)
        if listing is None:
            return None
        key = listing.path if listing.path == path else path
        listings[key] = listing  # now the most recent
        # the dictionary's own key: the sessions share it rather than keeping a copy each
        return key, listing

    def put(self, path: str, listing: Listing) -> None:
        """Keep C{listing} as the last one of C{path} (never modified afterwards)."""
        self.forget(path)
        if len(listing) > self.budget // 10:
            return
        listing.path = path
        self._listings[path] = listing
        self._messages += len(listing)
        while self._messages > self.budget or len(self._listings) > self.entries:
            oldest = next(iter(self._listings))
            self._messages -= len(self._listings.pop(oldest))

    def forget(self, path: str) -> None:
        old = self._listings.pop(path, None)
        if old is not None:
            self._messages -= len(old)

    def __len__(self) -> int:
        return len(self._listings)


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
        self._entries: OrderedDict[str, tuple[bytes, list[str], Sequence[MessageInfo]]] = OrderedDict()
        self._messages = 0
        self._lock = threading.Lock()

    def get(self, path: str, raw: bytes) -> tuple[list[str], Sequence[MessageInfo]] | None:
        """(base names, listing) made from index content C{raw} of C{path}, if kept."""
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

    def put(self, path: str, raw: bytes, bases: list[str], infos: Sequence[MessageInfo]) -> None:
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
