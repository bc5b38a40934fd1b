"""
Durability on the local file system, shared by the Maildir store and the
fetch client: making a directory's entries (created, renamed, removed
names) durable.  Standard library only: the fetch path imports it.
"""

from __future__ import annotations

import os

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: str) -> None:
    """Make C{path}'s entries (created, renamed, removed names) durable."""
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
