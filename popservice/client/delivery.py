"""
Crash-safe delivery shared by both fetch engines (Twisted:
L{popservice.client.fetch}; blocking: L{popservice.client.blocking}).  The
engines only talk to the server; everything that touches local state is
here, and nothing here imports Twisted.

The fetcher: download new mail from a POP3 server into a Maildir, an mbox or
an MDA, exactly once, whatever moment the process is killed at.

Crash safety rests on one rule: a message is marked for deletion (DELE) only
after its local copy is durable (fsynced) I{and} its UIDL is recorded in the
journal (fsynced append); and a message whose UIDL is in the journal is never
delivered again.  The journal is per account (a directory with C{journal} and
C{lock}); records are lines:

    D <uidl>                     delivered
    M <uidl> <tmp> <final>       delivered into a Maildir: tmp/<tmp> is durable
                                 and is renamed to new/<final> (redone at start-up
                                 when a crash came between the two)
    B <offset>                   an mbox batch starts at <offset> (fsynced first)
    C                            the D lines since the last B are committed
    I <uidl>                     an MDA is about to run for <uidl>, or it is about
                                 to be forwarded (LMTP/SMTP)
    X <uidl>                     ... and the receiving server refused it: nothing
                                 to warn about

A torn last line (no LF) is ignored and cut off.  Recovery at start-up: Maildir
renames are completed and our orphaned tmp/ files removed; an mbox batch
without C{C} is truncated away (its D lines do not count); an MDA run without
its D may or may not have delivered (an MDA cannot be rolled back): it is run
again (at-least-once) and a warning says so; so is a forwarding whose D is
missing (L{popservice.client.forward}: the receiving server may have
accepted it just before the crash).  Compaction rewrites the journal
as D lines for the UIDLs still on the server, atomically (temporary file,
fsync, rename, fsync directory).

Speed: RETRs are pipelined (a window of outstanding commands) and driven by
plain callbacks; into a Maildir each complete message is written with one
writev to a fresh tmp/ file, and durability is batched: per batch one
syncfs(2) (Linux; elsewhere, or with C{--sync file}, an fdatasync of each
file and one fsync of tmp/), one journal append+fsync, the renames, then the
DELEs.  On the machine that measured it, 1,000 fdatasyncs cost ~0.1 s that
one syncfs does not.  A server without UIDL is refused (exactly-once is
impossible without it).

This module holds the engine-independent part of a fetch: L{DeliverySession}
(what to fetch and delete, the batches, commit before DELE) with its
L{FetchOptions} and L{FetchResult}.  The rest lives beside it and is
re-exported here: the journal in L{popservice.client.journal}, the targets
in L{popservice.client.targets}, syncfs/fsync helpers in
L{popservice.client.durability}, the progress bar in L{popservice.client.progress}.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

from popservice.client.durability import SYNC_FILE_RANGE_WRITE, fsync_dir, start_writeback, syncfs
from popservice.client.journal import Journal, StateLocked
from popservice.client.progress import Progress
from popservice.client.targets import (
    DeliveryError,
    MaildirTarget,
    MboxTarget,
    MDATarget,
    MessageRefused,
    Target,
)
from popservice.client.targets import make_target as _make_local_target

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = [
    "DeliveryError", "DeliverySession", "FetchOptions", "FetchResult", "Journal",
    "MaildirTarget", "MboxTarget", "MDATarget", "MessageRefused", "Progress", "StateLocked", "Target",
    "fsync_dir", "make_target",
    # re-exported for the engines and older imports
    "SYNC_FILE_RANGE_WRITE", "start_writeback", "syncfs",
]


# --------------------------------------------------------------------------
# The fetch loop

class FetchOptions:
    """How a fetch runs (keyword arguments; every one has a default)."""

    __slots__ = ("batch_bytes", "batch_messages", "early_writeback", "keep", "limit", "max_size",
                 "on_reject", "stop", "threaded_sync", "window")

    def __init__(self, *, keep: bool = False, limit: int | None = None, max_size: int | None = None,
                 window: int = 32, batch_messages: int = 256, batch_bytes: int = 16 * 1024 * 1024,
                 threaded_sync: bool = False, early_writeback: bool = True, on_reject: str = "keep",
                 stop: Callable[[], bool] | None = None) -> None:
        if on_reject not in ("keep", "delete"):
            raise ValueError(f"on_reject must be keep or delete, not {on_reject!r}")
        self.keep = keep
        self.limit = limit
        self.max_size = max_size
        #: a message a receiving server refused permanently (5xx; forwarding
        #: targets): C{"keep"} it on the POP3 server unrecorded (it is tried
        #: again by every run, and reported each time), or C{"delete"}: record
        #: it as handled (DELE'd unless C{keep}) and report it once
        self.on_reject = on_reject
        #: asked before each new RETR (Twisted engine): once it returns True no
        #: more are sent; what is in flight is received, committed and DELE'd,
        #: and the session ends normally (the daemon's SIGTERM)
        self.stop = stop
        #: outstanding RETRs when the server pipelines
        self.window = window
        #: messages / bytes per durability batch
        self.batch_messages = batch_messages
        self.batch_bytes = batch_bytes
        #: make a batch durable in a thread while the next one downloads (the
        #: commit still waits for it); the CLI turns it on for the blocking
        #: engine, where one syncfs per batch overlaps the download (~5% faster
        #: here); with an fdatasync per file it measured slower on ext4 (file
        #: creation then waits on the journal commit)
        self.threaded_sync = threaded_sync
        #: Maildir: start each file's writeback as soon as it is written (measured
        #: faster for the Twisted engine; slower for the blocking one on ext4, where
        #: creating the next file then waits behind that writeback)
        self.early_writeback = early_writeback


class FetchResult:
    """What a fetch did; L{summary} is the line the CLI prints."""

    def __init__(self) -> None:
        #: messages on the server when the run began
        self.total_on_server = 0
        self.fetched = 0
        self.bytes = 0
        self.deleted = 0
        self.skipped_size = 0
        self.already = 0
        #: refused for now by a receiving server (4xx): left on the server for the next run
        self.deferred = 0
        #: refused permanently (5xx): kept on the server, or dropped (FetchOptions.on_reject)
        self.rejected = 0
        self.rejected_dropped = False
        #: the run was asked to stop (FetchOptions.stop) before it had fetched everything
        self.stopped = False
        self.seconds = 0.0
        self.warnings: list[str] = []

    def summary(self) -> str:
        rate = self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        parts = [f"{self.fetched} message{'s' if self.fetched != 1 else ''} fetched "
                 f"({self.bytes} bytes, {self.seconds:.2f} s, {rate:.1f} MB/s)"]
        parts.append(f"{self.deleted} deleted on server")
        if self.already:
            parts.append(f"{self.already} already fetched")
        if self.skipped_size:
            parts.append(f"{self.skipped_size} skipped (too large)")
        if self.deferred:
            parts.append(f"{self.deferred} deferred by the receiving server (kept for the next run)")
        if self.rejected:
            fate = "recorded and dropped" if self.rejected_dropped else "kept on server"
            parts.append(f"{self.rejected} rejected by the receiving server ({fate})")
        if self.stopped:
            parts.append("stopped early")
        # the count before the run less what it deleted (the deletions take effect at QUIT)
        parts.append(f"{self.total_on_server - self.deleted} left on server")
        return ", ".join(parts)



# --------------------------------------------------------------------------
# The engine-independent part of a fetch

class DeliverySession:
    """
    What both engines share: which messages to fetch and delete (L{plan}),
    and the batches: messages are L{store}d or L{finished} (not yet durable),
    then L{flush} makes the batch durable, records it in the journal and
    publishes it, and only then returns the message numbers an engine may
    send DELE for.  An engine does the network I/O and calls these in order.
    """

    def __init__(self, target: Target, journal: Journal, options: FetchOptions | None = None,
                 progress: Progress | None = None) -> None:
        self.target = target
        self.journal = journal
        self.options = options or FetchOptions()
        self.progress = progress or Progress(enabled=False)
        self.result = FetchResult()
        self.number: dict[str, int] = {}
        self.batch_uids: list[str] = []
        self.batch_writers: list[Any] = []
        self.batch_bytes = 0
        self._immediate = target.immediate
        #: permanently refused messages recorded anyway (FetchOptions.on_reject "delete")
        self._dropped: set[str] = set()

    def plan(self, uidls: Sequence[tuple[int, str]],
             sizes: Mapping[int, int]) -> tuple[list[tuple[int, str, int]], list[int]]:
        """
        Recover from a crash, compact the journal, and decide: returns the
        C{(number, uidl, size)} to download and the numbers of messages
        already delivered that may be deleted now (empty with C{keep}).
        """
        journal, opts, result = self.journal, self.options, self.result
        self.target.recover(journal)
        result.total_on_server = len(uidls)
        on_server = {uid for _, uid in uidls}
        if journal.needs_compaction or journal.delivered - on_server:
            journal.compact(keep=on_server)
        todo: list[tuple[int, str, int]] = []
        delete: list[int] = []
        seen: set[str] = set()
        delivered = journal.delivered
        for number, uid in uidls:
            self.number[uid] = number
            if uid in delivered:
                result.already += 1
                if not opts.keep:
                    delete.append(number)
                continue
            if uid in seen:
                result.warnings.append(
                    f"duplicate UIDL {uid} on the server: message {number} skipped")
                continue
            seen.add(uid)
            size = sizes.get(number, 0)
            if opts.max_size is not None and size > opts.max_size:
                result.skipped_size += 1
                continue
            todo.append((number, uid, size))
        if opts.limit is not None:
            todo = todo[:opts.limit]
        self.progress.begin(len(todo), sum(s for _, _, s in todo))
        return todo, delete

    def _add(self, uid: str, writer: Any, stored: int) -> bool:
        self.batch_uids.append(uid)
        self.batch_writers.append(writer)
        self.batch_bytes += stored
        self.progress.advance(stored)
        opts = self.options
        return (self._immediate or len(self.batch_uids) >= opts.batch_messages
                or self.batch_bytes >= opts.batch_bytes)

    @property
    def stopping(self) -> bool:
        """Has the fetch been asked to send no more RETRs (L{FetchOptions.stop})?"""
        stop = self.options.stop
        return stop is not None and stop()

    def store(self, uid: str, chunks: list[bytes]) -> bool:
        """A complete message for a L{MaildirTarget}; True when the batch is full."""
        target = self.target
        assert isinstance(target, MaildirTarget)
        writer = target.store(uid, chunks, self.options.early_writeback)
        return self._add(uid, writer, writer.size)

    def finished(self, uid: str, writer: Any) -> bool:
        """
        A message written through C{target.open(...).write}; True when the
        batch is full.  An L{immediate <Target.immediate>} target hands it on
        here (blocking: the Twisted engine calls this in a thread for them); a
        message the receiver refused (L{MessageRefused}) is counted and left
        out of the batch (False), so it is neither recorded nor DELE'd.
        """
        target = self.target
        try:
            stored = target.finished(writer)
            if self._immediate:
                target.deliver(uid, writer)
        except MessageRefused as refused:
            with contextlib.suppress(Exception):
                target.abort(writer)
            return self._refused(uid, writer, stored, refused)
        except BaseException:
            with contextlib.suppress(Exception):
                target.abort(writer)
            raise
        return self._add(uid, writer, stored)

    def _refused(self, uid: str, writer: Any, stored: int, refused: MessageRefused) -> bool:
        result = self.result
        if refused.temporary:
            result.deferred += 1
            result.warnings.append(f"{refused}: left on the server for the next run")
        else:
            result.rejected += 1
            if self.options.on_reject == "delete":
                result.rejected_dropped = True
                result.warnings.append(f"{refused}: recorded as handled and dropped (on-reject delete)")
                self._dropped.add(uid)
                return self._add(uid, writer, 0)
            result.warnings.append(f"{refused}: kept on the server (every run tries it again)")
        self.progress.advance(stored)
        return False

    def take_batch(self) -> tuple[list[str], list[Any], int]:
        batch = self.batch_uids, self.batch_writers, self.batch_bytes
        self.batch_uids, self.batch_writers, self.batch_bytes = [], [], 0
        return batch

    def commit(self, uids: list[str], writers: list[Any], nbytes: int) -> list[int]:
        """
        Record a prepared (durable) batch in the journal and publish it;
        returns the numbers to DELE.  When this fails the files are left
        alone: the journal may already name them, and recovery sorts it out.
        """
        self.target.commit(self.journal, uids, writers)
        result = self.result
        result.fetched += len(uids) - (len(self._dropped.intersection(uids)) if self._dropped else 0)
        result.bytes += nbytes
        if self.options.keep:
            return []
        number = self.number
        return [number[uid] for uid in uids]

    def flush(self) -> list[int]:
        """Make the current batch durable and commit it; returns the numbers to DELE."""
        uids, writers, nbytes = self.take_batch()
        if not uids:
            return []
        try:
            self.target.prepare(writers)
        except BaseException:
            self.batch_uids, self.batch_writers, self.batch_bytes = uids, writers, nbytes
            raise
        return self.commit(uids, writers, nbytes)

    def abort(self, writers: Sequence[Any] = ()) -> None:
        """Forget the uncommitted batch (and C{writers} in progress): nothing of it counts."""
        for w in list(writers) + self.batch_writers:
            with contextlib.suppress(Exception):
                self.target.abort(w)
        self.batch_uids, self.batch_writers, self.batch_bytes = [], [], 0


def make_target(spec: str, *, username: str, state_dir: str, crlf: bool = False,
                warn: Callable[[str], None] = print, tag: str = "", sync: str = "batch",
                recipients: Sequence[str] = (), timeout: float = 60.0) -> Target:
    """
    A delivery target from its spec: C{maildir:PATH}, C{mbox:PATH},
    C{mda:COMMAND} (L{popservice.client.targets.make_target}), or a
    forwarding one (L{popservice.client.forward}): C{lmtp:HOST:PORT},
    C{lmtp:/path/to/socket}, C{smtp:HOST[:PORT]} for C{recipients}
    (LMTP: the local user name when empty; SMTP needs at least one).  The
    forwarding module, and smtplib, are imported only for those.
    """
    kind = spec.partition(":")[0]
    if kind in ("lmtp", "smtp"):
        from popservice.client.forward import make_forward_target

        return make_forward_target(spec, recipients=recipients, timeout=timeout, warn=warn)
    if recipients:
        raise ValueError("recipients only apply to lmtp: and smtp: targets")
    return _make_local_target(spec, username=username, state_dir=state_dir, crlf=crlf, warn=warn,
                              tag=tag, sync=sync)
