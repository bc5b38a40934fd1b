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
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from typing import NamedTuple

from twisted.logger import Logger

from popservice.interfaces import MessageInfo
from popservice.stores.maildir import cache
from popservice.stores.maildir.importers import DovecotUIDLFormat, _load_index
from popservice.stores.maildir.layout import _find_all, _move_new_to_cur, _relpath
from popservice.stores.maildir.order import _sorted_bases
from popservice.stores.maildir.sizes import _w_size, compute_size
from popservice.stores.maildir.uidlist import INDEX_FILE_NAME, _index_lock, _read_bytes, _write_index

__all__ = ["scan_maildir"]

log = Logger(namespace="popservice.stores.maildir")

_SIZE_OF = operator.itemgetter(1)


class _Scan(NamedTuple):
    """The session listing of a Maildir, oldest first, as parallel lists."""

    #: where each message is: its name in cur/ (most), else C{"new/<name>"}; see L{_relpath}
    files: list[str]
    infos: list[MessageInfo]


def scan_maildir(path: str, uidl_format: DovecotUIDLFormat) -> _Scan:
    """
    The session listing of the Maildir at C{path}, oldest first, after moving
    new/ to cur/ and bringing the index up to date.  Runs in a thread.

    When the files match the index (a warm login with nothing new), this is a
    handful of whole-list operations, with no per-message Python code but the
    making of the L{MessageInfo}s, none at all when L{_listing_cache} has the
    listing of this index; the index is then not rewritten.
    """
    _move_new_to_cur(path)
    with _index_lock(path):
        raw = _read_bytes(os.path.join(path, INDEX_FILE_NAME))
        found = _find_all(path)
        if raw is not None:
            cached = cache._listing_cache.get(path, raw)
            if cached is not None:
                bases, cached_infos = cached
                if len(found) == len(bases) and all(map(found.__contains__, bases)):
                    return _Scan(list(map(found.__getitem__, bases)), cached_infos)
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
    if not order:
        return _Scan([], [])
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
    infos = list(map(MessageInfo, sizes, uidls))
    if source is not None:
        cache._listing_cache.put(path, source, order, infos)
    return _Scan(list(map(found.__getitem__, order)), infos)
