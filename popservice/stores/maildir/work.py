"""
The thread pool the Maildir store's file system work runs in: first scans
(listing, sizing, the UIDL index written with C{fsync}), making Maildirs,
deliveries, deletions at UPDATE and EXPIRE.

Its own pool rather than the reactor's (10 threads): the work is disk-bound
(the index and every delivery end in C{fsync}), so a few threads keep the
disk busy, while each further thread only holds memory (stack, interpreter
state, a malloc arena: about 50 KiB each, measured under a burst of 50
first logins) and, shared, would queue other users of the reactor's pool
behind a burst of first logins.  Logins beyond the threads wait in the
pool's queue, bounded by the server's connection caps.
"""

from __future__ import annotations

from popservice.workpool import WorkPool

__all__ = ["MAILDIR_THREADS", "maildir_pool"]

#: Threads doing Maildir file system work.
MAILDIR_THREADS = 4

#: The pool every Maildir store and mailbox runs its blocking work in.
maildir_pool = WorkPool("popservice-maildir", MAILDIR_THREADS)
