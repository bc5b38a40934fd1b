"""
Has a Maildir changed since its listing was made?  A warm login answers it
with four C{stat} calls on the reactor thread instead of a scan in the
thread pool.

What another program's change does on disk:

 - a delivery links a file into C{new/} (or C{cur/}): that directory's
   mtime changes;
 - a removal unlinks a file from C{cur/} or C{new/}: the same;
 - a flag change by another client renames within C{cur/}: C{cur/}'s mtime;
 - a replaced C{cur/} or C{new/} (or a symbolic link put there) is another
   inode;
 - our index, C{popservice-uidlist}, is only ever replaced by a rename
   (L{popservice.stores.maildir.uidlist._write_index}, under the index
   lock): another inode, and the old one stays in use until the rename, so
   the new one never has its number.

So the I{state} of a listing is the Maildir's own C{(st_dev, st_ino,
st_uid)} as it was when its mail-root check passed (L{identity}), C{(st_ino,
st_mtime_ns)} of C{cur/} and
C{new/} (taken before they are read) and C{(st_ino, st_mtime_ns, st_size)}
of the index (taken after it is written, under the index lock).  File
systems stamp times from a coarse clock (a few milliseconds on Linux; whole
seconds on some), so a change in the same tick as the listing could leave
an mtime unchanged: a listing whose C{cur/} or C{new/} was modified less
than L{SETTLE} seconds before it was read gets no state (C{None}), and the
next login scans again.
"""

from __future__ import annotations

import os
import stat
import struct
import time

from popservice.stores.maildir.uidlist import INDEX_FILE_NAME

__all__ = ["SETTLE", "directories_state", "identity", "index_state", "pack_state", "stamp", "warm_state"]

#: A directory modified less than this many seconds before it was read may change again unseen.
SETTLE = 2.0
_SETTLE_NS = int(SETTLE * 1e9)

_STATE = struct.Struct("=7q")
_IDENTITY = struct.Struct("=QQq")

#: (st_ino, st_mtime_ns) of cur/ and new/
DirectoriesState = tuple[int, int, int, int]
#: (st_ino, st_mtime_ns, st_size) of the index
IndexState = tuple[int, int, int]


def identity(path: str) -> tuple[bytes, int] | None:
    """
    The identity of the Maildir C{path} itself (C{st_dev}, C{st_ino},
    C{st_uid}, packed) and its owner's uid; C{None} when it is missing or a
    symbolic link (then always checked in full).
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return _IDENTITY.pack(st.st_dev, st.st_ino, st.st_uid), st.st_uid


def directories_state(path: str, now_ns: int | None = None) -> tuple[DirectoriesState | None, bool]:
    """
    The state of C{cur/} and C{new/} (C{None} when one is missing or no
    directory), and whether both were last modified at least L{SETTLE}
    seconds before C{now_ns} (default: now).
    """
    try:
        cur = os.lstat(os.path.join(path, "cur"))
        new = os.lstat(os.path.join(path, "new"))
    except OSError:
        return None, False
    if not (stat.S_ISDIR(cur.st_mode) and stat.S_ISDIR(new.st_mode)):
        return None, False
    limit = (time.time_ns() if now_ns is None else now_ns) - _SETTLE_NS
    settled = cur.st_mtime_ns <= limit and new.st_mtime_ns <= limit
    return (cur.st_ino, cur.st_mtime_ns, new.st_ino, new.st_mtime_ns), settled


def index_state(path: str) -> IndexState | None:
    """The state of the index file (C{None} when there is none)."""
    try:
        st = os.stat(os.path.join(path, INDEX_FILE_NAME))
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def pack_state(directories: DirectoriesState, index: IndexState) -> bytes:
    """The state as one small object (what a cached listing keeps)."""
    return _STATE.pack(*directories, *index)


def stamp(identity: bytes, state: bytes) -> bytes:
    """The whole state: the Maildir's identity and the state of what is in it."""
    return identity + state


def warm_state(path: str, identity: bytes) -> bytes | None:
    """
    The state of the Maildir with this C{identity} now, to compare with a
    listing's; C{None} when incomplete.
    """
    directories, _ = directories_state(path, 0)
    if directories is None:
        return None
    index = index_state(path)
    if index is None:
        return None
    return identity + pack_state(directories, index)
