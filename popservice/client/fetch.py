"""
The Twisted fetch engine: drives a L{POP3Client} through
L{popservice.client.delivery.DeliverySession}, which owns the crash-safety
rules, the journal and the delivery targets (see its docstring); this module
only talks to the server (pipelined RETRs driven by plain callbacks) and
re-exports the delivery names.  C{popservice fetch} uses the blocking engine
(L{popservice.client.blocking}) by default and this one with C{--engine twisted}.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from popservice.client.common import NoUIDLError
from popservice.client.delivery import (
    DeliveryError,
    DeliverySession,
    FetchOptions,
    FetchResult,
    Journal,
    MaildirTarget,
    MboxTarget,
    MDATarget,
    Progress,
    StateLocked,
    Target,
    fsync_dir,
    make_target,
    start_writeback,
    syncfs,
)
from popservice.client.protocol import POP3Client, POP3Error, UidlEntry

__all__ = [
    "DeliveryError", "FetchOptions", "FetchResult", "Fetcher", "Journal", "MaildirTarget",
    "MboxTarget", "MDATarget", "NoUIDLError", "Progress", "StateLocked",
    "Target", "fetch", "fsync_dir", "make_target", "start_writeback", "syncfs",
]

NO_UIDL = ("popservice fetch needs it to deliver every message exactly once; "
           "nothing was fetched or deleted")


class Fetcher:
    """One fetch session over a logged-in client (see the module docstring)."""

    def __init__(self, client: POP3Client, target: Target, journal: Journal,
                 options: FetchOptions | None = None, progress: Progress | None = None) -> None:
        self.client = client
        self.target = target
        self.journal = journal
        self.session = DeliverySession(target, journal, options, progress)
        self.options = self.session.options
        self.progress = self.session.progress
        self.result = self.session.result
        self._deletes: list[defer.Deferred[Any]] = []

    @defer.inlineCallbacks
    def run(self) -> Any:
        started = time.monotonic()
        client = self.client
        d_uidl = client.uidl()
        d_list = client.list()
        try:
            uidls: list[UidlEntry] = yield d_uidl
        except POP3Error as err:
            d_list.addErrback(lambda _: None)
            # Without UIDL no message can be told apart from another across runs:
            # neither "fetch only new ones" (--keep) nor "never twice after a
            # crash" (deleting) can be kept.  Refuse rather than guess.
            raise NoUIDLError(f"the server does not support UIDL ({err}): {NO_UIDL}")
        sizes = {e.number: e.size for e in (yield d_list)}
        todo, delete = self.session.plan([(e.number, e.uid) for e in uidls], sizes)
        self._delete(delete)
        try:
            if isinstance(self.target, MaildirTarget) and todo:
                yield _MaildirDownload(self, todo).run()
            else:
                yield self._download(todo)
        finally:
            self.progress.done()
        if self._deletes:
            yield defer.gatherResults(self._deletes, consumeErrors=True)
        if self.target.immediate:  # a forwarding target's QUIT blocks: not in the reactor
            from twisted.internet import threads

            yield threads.deferToThread(self.target.close)
        else:
            self.target.close()
        self.result.seconds = time.monotonic() - started
        return self.result

    def _delete(self, numbers: list[int]) -> None:
        def counted(_: object) -> None:
            self.result.deleted += 1

        for number in numbers:
            self._deletes.append(self.client.delete(number).addCallback(counted))

    @defer.inlineCallbacks
    def _download(self, todo: list[tuple[int, str, int]]) -> Any:
        opts, target, session = self.options, self.target, self.session
        window = opts.window if self.client.capa is not None and self.client.capa.pipelining else 1
        pending: deque[tuple[str, int, list[bytes], defer.Deferred[Any]]] = deque()
        queue = deque(todo)
        syncing: defer.Deferred[Any] | None = None

        def issue() -> None:
            # Collected, and handed to the target only once complete (as the
            # blocking engine does): the RETRs in flight must not each open
            # the target, for an mbox is one file and their envelope lines
            # and bodies would interleave.
            number, uid, size = queue.popleft()
            chunks: list[bytes] = []
            d = self.client.retrieve(number, chunks.append, crlf=target.crlf)
            pending.append((uid, size, chunks, d))

        def flush_batch() -> defer.Deferred[Any]:
            uids, writers, nbytes = session.take_batch()
            if opts.threaded_sync and target.threadable:
                from twisted.internet import threads

                d = threads.deferToThread(target.prepare, writers)
            else:
                target.prepare(writers)
                d = defer.succeed(None)

            def prepared(_: object) -> None:
                self._delete(session.commit(uids, writers, nbytes))

            return d.addCallback(prepared)

        try:
            while queue and len(pending) < window and not session.stopping:
                issue()
            while pending:
                uid, size, chunks, d = pending.popleft()
                yield d
                writer = target.open(uid, size)
                try:
                    for chunk in chunks:
                        writer.write(chunk)
                except BaseException:
                    session.abort([writer])
                    raise
                del chunks[:]
                if target.immediate:
                    # an MDA or a forwarding target blocks: a thread, so the
                    # reactor (other accounts, in the daemon) goes on meanwhile
                    from twisted.internet import threads

                    full = yield threads.deferToThread(session.finished, uid, writer)
                else:
                    full = session.finished(uid, writer)
                if queue and not session.stopping:
                    issue()
                if full:
                    if syncing is not None:
                        yield syncing
                    syncing = flush_batch()
            if syncing is not None:
                yield syncing
                syncing = None
            if session.batch_uids:
                yield flush_batch()
            if queue:
                self.result.stopped = True
        except BaseException:
            for _, _, _, d in pending:  # they fail with the connection: nothing to report twice
                d.addErrback(lambda _: None)
            session.abort()
            if syncing is not None:
                with contextlib.suppress(Exception):
                    yield syncing
            raise


class _MaildirDownload:
    """
    The Maildir fast path: pipelined RETRs driven by plain callbacks (no
    coroutine step per message).  Each message is collected as the chunks the
    decoder hands over and written when complete with one C{writev} to a new
    tmp/ file, whose writeback starts at once; per batch the files are made
    durable, the batch's journal records appended (fsynced), the files renamed
    into new/, and only then are the batch's DELEs sent.  The invariant is that
    of the module docstring: DELE after local copy and journal record are durable.

    (A disk thread was measured slower: every system call it makes then waits
    for the GIL held by the protocol code.)
    """

    def __init__(self, fetcher: Fetcher, todo: list[tuple[int, str, int]]) -> None:
        self.fetcher = fetcher
        self.client = fetcher.client
        self.session = fetcher.session
        self.crlf = fetcher.target.crlf
        self.todo = deque(todo)
        self.outstanding = 0
        self.done: defer.Deferred[None] = defer.Deferred()

    def run(self) -> "defer.Deferred[None]":
        caps = self.client.capa
        window = self.fetcher.options.window if caps is not None and caps.pipelining else 1
        while self.todo and self.outstanding < window and not self.session.stopping:
            self._issue()
        if not self.outstanding:
            self._finish()
        return self.done

    def _issue(self) -> None:
        number, uid, _size = self.todo.popleft()
        chunks: list[bytes] = []
        self.outstanding += 1
        d = self.client.retrieve(number, chunks.append, crlf=self.crlf)
        d.addCallbacks(self._retrieved, self._failed, callbackArgs=(uid, chunks))

    def _retrieved(self, _: object, uid: str, chunks: list[bytes]) -> None:
        self.outstanding -= 1
        if self.done.called:
            return
        try:
            if self.session.store(uid, chunks):
                self.fetcher._delete(self.session.flush())
            if self.todo and not self.session.stopping:
                self._issue()
            elif not self.outstanding:
                self._finish()
        except BaseException:
            self._abort(Failure())

    def _finish(self) -> None:
        if self.todo:  # asked to stop (FetchOptions.stop): what was received is committed
            self.fetcher.result.stopped = True
        self.fetcher._delete(self.session.flush())
        self.done.callback(None)

    def _failed(self, f: Failure) -> None:
        self.outstanding -= 1
        self._abort(f)

    def _abort(self, f: Failure) -> None:
        if self.done.called:
            return
        self.todo.clear()
        self.session.abort()
        self.done.errback(f)


@defer.inlineCallbacks
def fetch(client: POP3Client, target: Target, state_dir: str,
          options: FetchOptions | None = None, progress: Progress | None = None,
          quit: bool = True) -> Any:
    """Run one fetch over a logged-in C{client}; fires with a L{FetchResult}."""
    journal = Journal(state_dir)
    try:
        fetcher = Fetcher(client, target, journal, options, progress)
        result = yield fetcher.run()
        if quit:
            try:
                yield client.quit()
            except POP3Error as e:
                result.warnings.append(f"QUIT failed ({e}): deletions may be incomplete; "
                                       "the next run deletes what is left")
        return result
    finally:
        journal.close()
