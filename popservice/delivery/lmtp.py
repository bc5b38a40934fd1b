"""
An LMTP server (RFC 2033) delivering into any L{IMailDelivery} store, built
on Twisted's ESMTP server (L{twisted.mail.smtp.ESMTP}; Twisted has no LMTP).

What differs from SMTP, and how it is done here:

 - C{LHLO} replaces C{HELO}/C{EHLO} (which get 500); it answers like EHLO,
   with C{PIPELINING}, C{8BITMIME} and C{SIZE}.  MAIL needs LHLO first.
 - RCPT asks the store (L{IMailDelivery.exists}): 250, 550 for an unknown
   user, 451 when the store cannot tell now.
 - After the final dot, one reply per accepted recipient, in RCPT order
   (RFC 2033 section 4.2): 250 when stored or already stored (the
   idempotency key, L{popservice.delivery.key}, makes an MTA's retry store
   nothing), 452 when the store is out of space, 451 for other temporary
   trouble, 550 when the mailbox is gone, 554 for an empty message, 552 for
   a message over the size limit (also at MAIL when C{SIZE=} declares it).

The message is read by this module, not by Twisted's line-based DATA code:
lines of any length, dot-unstuffing across reads, the size counted as it
arrives (a message over the limit is dropped as it streams in, never held),
and commands that a pipelining client sends after the final dot wait until
the replies for that message are out.

No trace header is added: the message is stored as the MTA handed it over
(the MTA in front of an LMTP server writes its own C{Received:} and
C{Delivered-To:}).  Mailbox user names are the local part of each recipient
address by default (C{user_for_address} changes that).

Only interfaces and Twisted are imported: the store may be a Maildir or a
database, and nothing here knows the POP3 server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from popservice.delivery.common import Trouble, classify, local_part_user
from popservice.delivery.key import delivery_key
from popservice.interfaces import IMailDelivery, IUserDirectory

__all__ = ["DEFAULT_MAX_SIZE", "LMTPFactory", "LMTPServer"]

log = Logger(namespace="popservice.delivery.lmtp")

#: The default message size limit: 50 MiB.
DEFAULT_MAX_SIZE = 50 * 1024 * 1024
#: Recipients of one transaction beyond this get 452 (RFC 5321 section 4.5.3.1.8 asks for 100 at least).
DEFAULT_MAX_RECIPIENTS = 1000
#: A command line longer than this is refused and the connection closed (RFC 5321 says 512).
MAX_COMMAND_LINE = 4096
#: Message text without a line end is passed on in pieces of this size.
_PARTIAL_LINE = 64 * 1024
#: The reply after the message, per kind of store failure.
_DATA_CODES = {Trouble.NO_MAILBOX: 550, Trouble.NO_SPACE: 452, Trouble.UNAVAILABLE: 451,
               Trouble.UNEXPECTED: 451}
#: Messages larger than this have their idempotency key computed in a thread.
_KEY_IN_THREAD = 256 * 1024
#: Our DATA mode (Twisted's own "DATA" mode is line based and answers once).
_DATA = "LMTP_DATA"


@dataclass(frozen=True)
class Recipient:
    """An accepted RCPT: the address as given and the mailbox user it names."""

    address: bytes
    user: str
    home: str | None


class LMTPServer(smtp.ESMTP):
    """One LMTP connection (see the module docstring)."""

    def __init__(self, config: "LMTPFactory") -> None:
        smtp.ESMTP.__init__(self)
        self.config = config
        self.host = config.hostname
        self.timeout = config.timeout
        self._inbuf = bytearray()
        self._recipients: list[Recipient] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_big = False
        self._line_start = True
        self._busy = False  # replies for a message are pending: later commands wait
        self._processing = False
        self._lost = False

    # -- the greeting, LHLO and the extensions ---------------------------

    def reply(self, code: int, text: bytes) -> None:
        """Send a reply (several lines when C{text} has several)."""
        if not self._lost:
            smtp.ESMTP.sendCode(self, code, text)

    def connectionMade(self) -> None:
        self.config.connections.add(self)
        smtp.ESMTP.connectionMade(self)

    def greeting(self) -> bytes:
        return self.config.hostname + b" LMTP popservice"

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        return {b"PIPELINING": None, b"8BITMIME": None, b"SIZE": [b"%d" % (self.config.max_size,)]}

    def do_LHLO(self, rest: bytes) -> None:
        if not rest.strip():
            self.reply(501, b"LHLO needs the client's name")
            return
        transport: Any = self.transport
        peer = getattr(transport.getPeer(), "host", None) or "local"
        self._helo = (rest, peer.encode("ascii", "replace") if isinstance(peer, str) else peer)
        self._from = None
        self._to = []
        self.reply(250, self.config.hostname + b"\n" + smtp.ESMTP.listExtensions(self))

    def do_HELO(self, rest: bytes) -> None:
        self.reply(500, b"This is LMTP: say LHLO (RFC 2033)")

    do_EHLO = do_HELO

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(250, b"OK")

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(252, b"Cannot VRFY; send the message and see")

    # -- MAIL and RCPT ----------------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:
        if not self._from:
            m = self.mail_re.match(rest)
            for option in ((m.group("opts") or b"").split() if m is not None else []):
                name, _, value = option.partition(b"=")
                if name.upper() == b"SIZE" and value.isdigit() and int(value) > self.config.max_size:
                    self.reply(552, b"Message size exceeds the limit of %d octets" % self.config.max_size)
                    return
        smtp.ESMTP.do_MAIL(self, rest)

    def do_RCPT(self, rest: bytes) -> None:
        """
        As Twisted's, but later commands wait for the answer (the store is
        asked in a thread): with PIPELINING, a DATA right behind RCPT must see it.
        """
        if not self._from:
            self.reply(503, b"Must have sender before recipient")
            return
        m = self.rcpt_re.match(rest)
        if not m:
            self.reply(501, b"Syntax error")
            return
        try:
            user = smtp.User(m.group("path"), self._helo, self, self._from)
        except smtp.AddressError as e:
            self.reply(553, str(e).encode("ascii", "replace"))
            return

        def accepted(recipient: Recipient) -> None:
            self._to.append((user, recipient))
            self.reply(250, b"<" + recipient.address + b"> OK")

        def refused(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, smtp.SMTPServerError):
                self.reply(error.code, str(error.resp).encode("ascii", "replace"))
            else:
                log.failure("RCPT", failure)
                self.reply(451, b"Local error in processing, try again later")

        def resume(_: None) -> None:
            self._busy = False
            self._process()

        self._busy = True
        self.validateTo(user).addCallbacks(accepted, refused).addBoth(resume)

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        if helo is None or helo[0] is None:
            raise smtp.SMTPBadSender(origin, 503, "Say LHLO first")
        return origin

    def validateTo(self, user: smtp.User) -> "defer.Deferred[Recipient]":
        if len(self._to) >= self.config.max_recipients:
            return defer.fail(smtp.SMTPServerError(452, "Too many recipients"))
        address = bytes(user.dest)
        name = self.config.user_for_address(user.dest.local, user.dest.domain)
        if not name:
            return defer.fail(smtp.SMTPBadRcpt(user.dest, 550, "No such user here"))
        directory = self.config.directory
        try:
            home = directory.home(name) if directory is not None else None
        except Exception:
            log.failure("looking up the home of {user}", user=name)
            return defer.fail(smtp.SMTPServerError(451, "Temporary failure looking up the user"))

        def checked(exists: bool) -> Recipient:
            if not exists:
                raise smtp.SMTPBadRcpt(user.dest, 550, "No such user here")
            return Recipient(address, name, home)

        def failed(failure: Failure) -> Recipient:
            trouble = classify(failure.value)
            if trouble is Trouble.NO_MAILBOX:
                raise smtp.SMTPBadRcpt(user.dest, 550, "No such user here")
            if trouble is Trouble.UNEXPECTED:
                log.failure("checking recipient {user}", failure, user=name)
            raise smtp.SMTPServerError(451, "Mailbox temporarily unavailable, try again later")

        d: defer.Deferred[bool] = defer.maybeDeferred(self.config.store.exists, name, home)
        return d.addCallbacks(checked, failed)

    # -- DATA: the message, then one reply per recipient -----------------

    def do_DATA(self, rest: bytes) -> None:
        if self._from is None or not self._to:
            self.reply(503, b"Must have valid receiver and originator")
            return
        self._recipients = [recipient for _user, recipient in self._to]
        self._from = None
        self._to = []
        self._chunks = []
        self._size = 0
        self._too_big = False
        self._line_start = True
        self.mode = _DATA
        self.reply(354, b"Start mail input; end with <CRLF>.<CRLF>")

    def dataReceived(self, data: bytes) -> None:
        self._inbuf += data
        if self._busy and len(self._inbuf) > self.config.max_size + _PARTIAL_LINE:
            # a client sending on and on while its message is stored: not an MTA
            log.warn("LMTP: closing a connection that sent {size} octets without waiting",
                     size=len(self._inbuf))
            self._inbuf.clear()
            transport: Any = self.transport
            transport.loseConnection()
            return
        self._process()

    def _closing(self) -> bool:
        return self._lost or bool(getattr(self.transport, "disconnecting", False))

    def _process(self) -> None:
        if self._processing:
            return  # re-entered from a reply sent synchronously: the loop below goes on
        self._processing = True
        try:
            while not self._busy and not self._closing():
                if self.mode == _DATA:
                    if not self._data_step():
                        return
                    continue
                i = self._inbuf.find(b"\n")
                if i < 0:
                    if len(self._inbuf) > MAX_COMMAND_LINE:
                        self._inbuf.clear()
                        self.reply(500, b"Line too long")
                        transport: Any = self.transport
                        transport.loseConnection()
                    return
                line = bytes(self._inbuf[:i]).rstrip(b"\r")
                del self._inbuf[:i + 1]
                if len(line) > MAX_COMMAND_LINE:
                    self.reply(500, b"Line too long")
                    continue
                smtp.ESMTP.lineReceived(self, line)
        finally:
            self._processing = False

    def _data_step(self) -> bool:
        """Take what can be taken of the message from the buffer; C{False}: wait for more."""
        buf = self._inbuf
        if not buf:
            return False
        smtp.ESMTP.resetTimeout(self)
        if self._line_start:
            if len(buf) < 3:
                return False
            if buf.startswith(b".\r\n"):
                del buf[:3]
                self._end_of_data()
                return True
        last = buf.rfind(b"\r\n")
        if last >= 0:
            block = bytes(buf[:last + 2])
            end = block.find(b"\r\n.\r\n")
            if end >= 0:
                block = block[:end + 2]
            del buf[:len(block)]
            self._add(block)
            self._line_start = True
            return True
        if len(buf) > _PARTIAL_LINE:
            block = bytes(buf[:-1])  # the last byte may be the CR of a CRLF
            del buf[:-1]
            self._add(block)
            self._line_start = False
            return True
        return False

    def _add(self, block: bytes) -> None:
        """Message text (whole lines, or a piece of a long line): un-stuffed, counted, kept."""
        if self._line_start and block.startswith(b"."):
            block = block[1:]
        block = block.replace(b"\r\n.", b"\r\n")
        self._size += len(block)
        if self._too_big:
            return
        if self._size > self.config.max_size:
            self._too_big = True
            self._chunks = []
            return
        self._chunks.append(block)

    def _end_of_data(self) -> None:
        self.mode = smtp.COMMAND
        recipients, self._recipients = self._recipients, []
        message = b"".join(self._chunks)
        self._chunks = []
        if self._too_big:
            log.info("LMTP: refused a message of {size} octets (limit {limit})", size=self._size,
                     limit=self.config.max_size)
            for _ in recipients:
                self.reply(552, b"Message size exceeds the limit of %d octets" % (self.config.max_size,))
            return
        if not message:
            for _ in recipients:
                self.reply(554, b"Empty message refused")
            return
        self._busy = True
        if len(message) > _KEY_IN_THREAD:
            key: defer.Deferred[str] = threads.deferToThread(delivery_key, message)
        else:
            key = defer.succeed(delivery_key(message))

        def deliver(key: str) -> "defer.Deferred[list[tuple[int, bytes]]]":
            return defer.gatherResults([self._deliver(recipient, message, key) for recipient in recipients])

        key.addCallback(deliver).addCallback(self._reply).addErrback(self._broken)

    def _deliver(self, recipient: Recipient, message: bytes, key: str) -> "defer.Deferred[tuple[int, bytes]]":
        where = b"<" + recipient.address + b">"

        def stored(new: bool) -> tuple[int, bytes]:
            log.info("LMTP: {outcome} {size} octets for {user}", user=recipient.user, size=len(message),
                     outcome="stored" if new else "already had", key=key)
            return 250, where + (b" stored" if new else b" already stored (retry ignored)")

        def failed(failure: Failure) -> tuple[int, bytes]:
            trouble = classify(failure.value)
            if trouble is Trouble.UNEXPECTED:
                log.failure("LMTP: delivery to {user} failed", failure, user=recipient.user)
            elif trouble is not Trouble.NO_MAILBOX:
                log.warn("LMTP: delivery to {user} failed for now: {why}", user=recipient.user,
                         why=failure.getErrorMessage())
            code = _DATA_CODES[trouble]
            text = where + b" " + trouble.value.encode("ascii")
            return code, text + (b", try again later" if code < 500 else b"")

        d: defer.Deferred[bool] = defer.maybeDeferred(
            self.config.store.deliver, recipient.user, recipient.home, message, key)
        return d.addCallbacks(stored, failed)

    def _reply(self, results: list[tuple[int, bytes]]) -> None:
        self._busy = False
        if self._lost:
            return  # stored all the same: the MTA's retry finds the keys
        for code, text in results:
            self.reply(code, text)
        self._process()

    def _broken(self, failure: Failure) -> None:
        log.failure("LMTP: after the message", failure)
        transport: Any = self.transport
        transport.loseConnection()  # the replies are lost: the MTA retries, the keys hold

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self.config.connections.discard(self)
        smtp.ESMTP.connectionLost(self, reason)


class LMTPFactory(protocol.ServerFactory):
    """
    LMTP connections delivering into C{store} (an L{IMailDelivery}).

    @param directory: home directories for stores with C{~} paths (the
        passwd-file checker provides L{IUserDirectory}).
    @param max_size: the message size limit in octets (552 beyond).
    @param user_for_address: C{(local, domain) -> user name or None} (None: 550).
    """

    def __init__(self, store: IMailDelivery, directory: IUserDirectory | None = None, *,
                 max_size: int = DEFAULT_MAX_SIZE, max_recipients: int = DEFAULT_MAX_RECIPIENTS,
                 hostname: str | bytes | None = None, timeout: int = 600,
                 user_for_address: Callable[[bytes, bytes], str | None] = local_part_user) -> None:
        if not IMailDelivery.providedBy(store):
            raise TypeError("%r does not provide IMailDelivery" % (store,))
        self.store = store
        self.directory = directory
        self.max_size = max_size
        self.max_recipients = max_recipients
        name = hostname if hostname is not None else smtp.DNSNAME
        self.hostname: bytes = name.encode("idna") if isinstance(name, str) else name
        self.timeout = timeout
        self.user_for_address = user_for_address
        #: the open connections
        self.connections: set[LMTPServer] = set()

    def buildProtocol(self, addr: Any) -> LMTPServer:
        server = LMTPServer(self)
        server.factory = self
        return server
