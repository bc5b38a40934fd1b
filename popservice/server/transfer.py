"""
RETR and TOP bodies (RFC 1939 sections 5 and 7) streamed from the store: one
chunk read at a time, byte-stuffed and given CRLF line ends by
L{wire.BodyEncoder} (correct across chunk boundaries), cut after the header and
C{n} body lines by L{wire.TopFilter}.  The shell asks for the next chunk only
while the transport wants more (its producer is not paused), so a client that
does not read costs one chunk of memory, not the message; and the chunk is a
small one once the client is not keeping up (L{popservice.server.pacing}).
"""

from __future__ import annotations

from typing import Any, Union

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from popservice import wire
from popservice.interfaces import (
    IImmediateMailbox,
    IImmediateMessageStream,
    IMessageStream,
    ISizedMessageStream,
    MessageGone,
)
from popservice.server.pacing import SMALL_CHUNK, BodyPacer
from popservice.server.quirks import OE_NS_EOH, OUTLOOK_NO_NULS, HeaderEnd
from popservice.server.session import MailboxSession
from popservice.server.shell import Shell


class MessageTransfer:
    """One message body on its way to the client (RETR, or TOP with C{lines})."""

    log = Logger()

    def __init__(self, shell: Shell, session: MailboxSession, stream: IMessageStream, index: int,
                 lines: int | None, size: int = 0) -> None:
        self.shell = shell
        self.session = session
        self.stream = stream
        self.index = index
        self.encoder = wire.BodyEncoder()
        self.top = wire.TopFilter(lines) if lines is not None else None
        #: a read from the store is under way
        self.waiting = False
        #: octets sent, the final dot line included
        self.sent = 0
        self.finished = False
        #: the chunk size, from how far the peer is behind: for stores that let us size their
        #: reads, and bodies of more than one small chunk (the shell's transport: Shell leaves it
        #: out, as the state objects never write to it)
        self.pacer = (BodyPacer(getattr(shell, "transport", None), shell.factory.config.write_buffer)
                      if ISizedMessageStream.providedBy(stream) and size > SMALL_CHUNK else None)
        quirks = shell.factory.config.client_quirks
        #: --client-quirks outlook-no-nuls: NUL bytes are left out
        self.no_nuls = OUTLOOK_NO_NULS in quirks
        #: --client-quirks oe-ns-eoh: a TOP that never left the header gets the empty line ending it
        self.header_end = HeaderEnd() if lines is not None and OE_NS_EOH in quirks else None
        #: the store's chunks are at hand: read without a Deferred each
        self.immediate = IImmediateMessageStream.providedBy(stream)

    def pump(self) -> None:
        """Read one chunk from the store and send it; the shell calls again for the next."""
        if self.pacer is not None:
            stream: Any = self.stream
            stream.chunk_size = self.pacer.chunk_size()
        if self.immediate:
            try:
                chunk: Union[bytes, Failure] = self.stream.read_now()  # type: ignore[attr-defined]
            except Exception:
                chunk = Failure()
            self._chunk(chunk)
            return
        self.waiting = True
        synchronous = True

        def got(data: Union[bytes, Failure]) -> None:
            self.waiting = False
            self._chunk(data)
            if not synchronous:
                self.shell.proceed()

        d: defer.Deferred[Any] = defer.maybeDeferred(self.stream.read)
        d.addBoth(got)
        synchronous = False

    def abandon(self) -> None:
        """The connection went away mid-transfer."""
        self._end()

    def _end(self) -> None:
        self.finished = True
        self.stream.close()
        if self.pacer is not None:
            self.pacer.reset()

    def _chunk(self, data: Union[bytes, Failure]) -> None:
        if self.finished or self.shell.closed:
            return
        if isinstance(data, Failure):
            self.log.failure("reading a message failed mid-transfer", data)
            self.abandon()
            # The +OK is out; the only honest signal left is closing.
            self.shell.close("message read error")
            return
        done = not data
        if data:
            if self.no_nuls:
                data = data.replace(b"\0", b"")
            if self.top is not None:
                data = self.top.feed(data)
                done = self.top.done
                if self.header_end is not None:
                    self.header_end.feed(data)
            out = self.encoder.encode(data)
            self.sent += len(out)
            self.shell.write(out)
            if self.pacer is not None:
                self.pacer.written()
        if done:
            tail = self.encoder.finish()
            if self.header_end is not None and not self.header_end.seen:
                tail = tail[:-len(wire.TERMINATOR)] + wire.CRLF + wire.TERMINATOR
            self.sent += len(tail)
            self.shell.write(tail)
            self._end()
            stats = self.session.stats
            if self.top is None:
                stats.retr_bytes += self.sent
                self.session.retrieved.add(self.index)
            else:
                stats.top_bytes += self.sent
            self.shell.touch()


def send_message(shell: Shell, session: MailboxSession, number: int, lines: int | None) -> bytes | None:
    """RETR msg (C{lines} None) or TOP msg lines: the C{+OK} line, then the body through a transfer."""
    index = session.message(number)
    if isinstance(index, bytes):
        return index
    mailbox = session.mailbox
    shell.wait()
    if IImmediateMailbox.providedBy(mailbox):
        # (a local file: opened now, no Deferred per message)
        try:
            stream = mailbox.open_now(index)
        except Exception:
            _failed(Failure(), shell, number)
        else:
            _opened(stream, shell, session, index, lines)
        return None
    d: defer.Deferred[Any] = defer.maybeDeferred(mailbox.open, index)
    d.addCallbacks(_opened, _failed, callbackArgs=(shell, session, index, lines), errbackArgs=(shell, number))
    return None


def _opened(stream: IMessageStream, shell: Shell, session: MailboxSession, index: int,
            lines: int | None) -> None:
    if shell.closed:
        stream.close()
        return
    size = session.listing[index].size
    if lines is None:
        session.stats.retr += 1
        shell.reply(wire.ok("%d octets" % (size,)))
    else:
        session.stats.top += 1
        shell.reply(wire.ok("Top of message follows"))
    shell.send_body(MessageTransfer(shell, session, stream, index, lines, size))
    shell.proceed()


def _failed(failure: Failure, shell: Shell, number: int) -> None:
    if failure.check(MessageGone):
        MessageTransfer.log.warn("message {n} of {user} is gone", n=number, user=shell.user)
        shell.reply(wire.err("Message is no longer available", "SYS/TEMP"))
    else:
        MessageTransfer.log.failure("opening message {n} of {user} failed", failure, n=number,
                                    user=shell.user)
        shell.reply(wire.err("Cannot read message", "SYS/TEMP"))
    shell.proceed()
