"""
The session listing of a Maildir (RFC 1939: message numbers, sizes and
UIDLs are fixed for the session): L{scan_maildir} moves C{new/} to C{cur/},
brings the C{popservice-uidlist} index up to date (a UIDL for each new
message, oldest first; a taken-over UIDL gets its size; a message gone loses
its entry) and makes the listing, oldest first.

A warm login reads no message file: sizes come from C{,W=} in the name or
from the index.  When the files match the index, nothing is written, and the
listing is made with whole-list operations (no per-message Python code), or
taken from the listing cache.  Runs in the reactor's thread pool.

The listing is stamped with the state of the Maildir it follows from
(L{popservice.stores.maildir.freshness}), when that is certain, so that the
next login can take it without coming here.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence

from twisted.logger import Logger

from popservice.stores.maildir import cache
from popservice.stores.maildir.freshness import directories_state, index_state, pack_state
from popservice.stores.maildir.importers import DovecotUIDLFormat, _load_index
from popservice.stores.maildir.layout import _find_all, _move_new_to_cur, _relpath
from popservice.stores.maildir.listing import Listing
from popservice.stores.maildir.order import _sorted_bases
from popservice.stores.maildir.sizes import _w_size, compute_size
from popservice.stores.maildir.uidlist import INDEX_FILE_NAME, _index_lock, _read_bytes, _write_index

__all__ = ["scan_maildir"]

log = Logger(namespace="popservice.stores.maildir")

_SIZE_OF = operator.itemgetter(1)


def scan_maildir(path: str, uidl_format: DovecotUIDLFormat) -> Listing:
    """
    The session listing of the Maildir at C{path}, oldest first, after moving
    new/ to cur/ and bringing the index up to date.  Runs in a thread.

    When the files match the index (a warm login with nothing new), this is a
    handful of whole-list operations, with no per-message Python code, none
    at all when L{_listing_cache} has the listing of this index; the index is
    then not rewritten.
    """
    _move_new_to_cur(path)
    with _index_lock(path):
        # before the directories are read: a change after this shows in their mtimes
        directories, settled = directories_state(path)
        raw = _read_bytes(os.path.join(path, INDEX_FILE_NAME))
        found = _find_all(path)
        if raw is not None:
            cached = cache._listing_cache.get(path, raw)
            if cached is not None:
                bases, cached_listing = cached
                if (isinstance(cached_listing, Listing) and len(found) == len(bases)
                        and all(map(found.__contains__, bases))):
                    listing = cached_listing.with_files(list(map(found.__getitem__, bases)))
                    _stamp(listing, path, directories, settled)
                    return listing
        index, import_sizes, dirty = _load_index(path, uidl_format, raw)
        entries = index.entries
        candidates = list(entries)
        added: list[str] = []
        if entries.keys() != found.keys():
            missing = entries.keys() - found.keys()
            if missing:
                # a rename by another program between two listings could hide a file
                # for a moment: look once more before forgetting its UIDL
                found = {**_find_all(path), **found}
                for b in missing:
                    if b not in found:
                        del entries[b]
                        dirty = True
                candidates = list(entries)
            added = list(found.keys() - entries.keys())  # new messages
            candidates += added
        # the index is kept in this order: sorting it again is cheap
        order = _sorted_bases(candidates)
        fresh: set[str] = set()
        unlisted: set[str] = set()
        pending = bool(entries) and min(map(_SIZE_OF, entries.values())) < 0
        if added or pending:
            # new messages, or taken-over UIDLs without a size: in order, so that
            # new UIDLs are given oldest first
            for base in order if pending else _sorted_bases(added):
                entry = entries.get(base)
                if entry is not None and entry[1] >= 0:
                    continue
                size = _w_size(base)
                if size is None and entry is not None:
                    size = import_sizes.get(base)
                if size is None:
                    relpath = _relpath(found[base])
                    try:
                        size = compute_size(os.path.join(path, relpath))
                    except OSError as e:
                        # a taken-over UIDL is kept (not listed) until its file can be read
                        log.warn("skipping unreadable message {file}: {error}", file=relpath, error=e)
                        unlisted.add(base)
                        continue
                if entry is None:
                    entries[base] = (index.new_uidl(), size)
                    fresh.add(base)
                else:
                    entries[base] = (entry[0], size)
                dirty = True
            if unlisted:
                order = [b for b in order if b not in unlisted]
        # the index content the listing follows from, if it lists every entry
        source: bytes | None = None if dirty or unlisted else raw
        if dirty:
            try:
                written = _write_index(path, index)
                if not unlisted:
                    source = written
            except OSError as e:
                # Like Courier: never show a UIDL that is not on disk, or it would
                # change at the next login.  New messages wait for a writable index.
                log.error("cannot write {file} in {path} ({error}): hiding {count} new messages",
                          file=INDEX_FILE_NAME, path=path, error=e, count=len(fresh))
                if fresh:
                    order = [b for b in order if b not in fresh]
        # the index as this listing leaves it, while nobody else may write it
        written_state = index_state(path) if source is not None else None
    listing = _make_listing(path, order, entries, found, source)
    if written_state is not None and directories is not None and settled:
        listing.state = pack_state(directories, written_state)
    return listing


def _stamp(listing: Listing, path: str, directories: "tuple[int, int, int, int] | None",
           settled: bool) -> None:
    """Give C{listing} the state it follows from (called under the index lock)."""
    if directories is None or not settled:
        return
    index = index_state(path)
    if index is not None:
        listing.state = pack_state(directories, index)


def _make_listing(path: str, order: list[str], entries: "dict[str, tuple[str, int]]",
                  found: dict[str, str], source: bytes | None) -> Listing:
    if not order:
        return Listing([], [], [])
    uidls, stored_sizes = zip(*map(entries.__getitem__, order), strict=True)
    sizes: Sequence[int] = stored_sizes
    if ",W=" in "\0".join(order):
        # the size in the name wins (other programs trust it too)
        sizes = list(stored_sizes)
        for i, base in enumerate(order):
            if ",W=" in base:
                w = _w_size(base)
                if w is not None:
                    sizes[i] = w
    listing = Listing(list(map(found.__getitem__, order)), sizes, uidls)
    if source is not None:
        cache._listing_cache.put(path, source, order, listing)
    return listing
