"""
Forwarding fetched mail to a mail server, the way fetchmail hands mail to the
local MTA: by LMTP (RFC 2033: C{--to lmtp:HOST:PORT} or
C{lmtp:/path/to/socket}) or by SMTP (RFC 5321: C{--to smtp:HOST[:PORT]},
port 25 by default).  Blocking, on smtplib, which only this module imports
(and only when such a target is made: a fetch into a Maildir never loads
either); the blocking engine calls it directly, the Twisted engine from a
thread.

Exactly once.  A message counts as delivered only when the receiving server
accepted it for every recipient: for SMTP the 250 after the final dot, for
LMTP the replies after the dot, one per recipient (RFC 2033 section 4.2),
every one 2xx.  Only then is it recorded in the journal (fsynced, a batch of
one) and only after that DELE'd.  Otherwise:

 - a recipient refused at RCPT: the transaction is reset before DATA, so no
   recipient gets the message;
 - 4xx (at MAIL, RCPT or after the dot): the message stays on the POP3
   server, unrecorded, and the next run or poll tries again; this run goes
   on with the next message and ends with EX_TEMPFAIL (75);
 - 5xx: reported; by default the message is kept the same way (every run
   tries it again and reports it again; the run ends with EX_FAIL, 1);
   C{--on-reject delete} records it as handled instead (DELE'd unless
   C{--keep}), reported once;
 - LMTP replies that differ per recipient: the message is kept, and the
   recipients that accepted it get it again at the retry (popservice's own
   LMTP server knows the retry by its idempotency key and stores it once);
 - no connection, a lost connection, a 421, a greeting or LHLO/EHLO
   refused: the run stops (75 for a 4xx or a network failure, 1 for a 5xx);
   what was accepted before is recorded and DELE'd.

The one window in which a crash can still duplicate a message lies between
the server's acceptance and the fsync of the journal's C{D} record.  An
C{I} record is appended before each message is sent (not fsynced: it
survives a killed process, not a power cut), and an C{X} record when the
server refused it; recovery warns about an C{I} left without either.

The envelope: MAIL FROM is the message's C{Return-Path} when it has one,
else the null sender C{<>}; C{SIZE=} and C{BODY=8BITMIME} are declared when
the server offers them.  Every line end goes out as CRLF (a lone CR or LF
becomes one: bare line ends are how SMTP smuggling works) and lines starting
with a dot are stuffed (smtplib).  The message is held in memory while it is
sent, as a Maildir delivery holds it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable, Sequence

from popservice.client.journal import Journal
from popservice.client.targets import DeliveryError, MessageRefused, Target

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["ForwardError", "ForwardTarget", "envelope_sender", "make_forward_target", "parse_forward_spec",
           "wire_form"]

#: SMTP's port; LMTP has none of its own, so an lmtp: target names its port
SMTP_PORT = 25

_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_END = re.compile(rb"\r\n\r\n")
_RETURN_PATH = re.compile(rb"(?im)^return-path[ \t]*:[ \t]*<([^<>\r\n]*)>")


class ForwardError(DeliveryError):
    """Forwarding cannot go on (connection, 421, greeting or LHLO/EHLO refused): the run stops."""

    def __init__(self, text: str, temporary: bool) -> None:
        super().__init__(text)
        self.temporary = temporary


def parse_forward_spec(spec: str) -> tuple[str, str | tuple[str, int]]:
    """
    C{lmtp:HOST:PORT}, C{lmtp:/path/socket}, C{smtp:HOST[:PORT]} (C{[v6]}
    for an IPv6 address) -> C{("lmtp" | "smtp", path or (host, port))}.
    """
    kind, _, rest = spec.partition(":")
    if kind not in ("lmtp", "smtp") or not rest:
        raise ValueError(f"forwarding target must be lmtp:HOST:PORT, lmtp:/path/socket or "
                         f"smtp:HOST[:PORT], not {spec!r}")
    if rest.startswith(("/", "~")):
        if kind != "lmtp":
            raise ValueError(f"smtp: takes HOST[:PORT] (a UNIX socket is for lmtp:), not {spec!r}")
        return kind, os.path.abspath(os.path.expanduser(rest))
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError(f"bad address in {spec!r}")
        port_text = after[1:] if after else None
    elif rest.count(":") > 1:
        raise ValueError(f"an IPv6 address goes in brackets ({kind}:[::1]:PORT), not {spec!r}")
    else:
        host, colon, port_text_ = rest.partition(":")
        port_text = port_text_ if colon else None
    if not host:
        raise ValueError(f"no host in {spec!r}")
    if port_text is None:
        if kind == "lmtp":
            raise ValueError(f"lmtp: needs a port (LMTP has no standard TCP port): {spec!r}")
        return kind, (host, SMTP_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {spec!r}")
    return kind, (host, int(port_text))


def wire_form(message: bytes) -> bytes:
    """The message with every line end a CRLF (dot-stuffing is smtplib's)."""
    return _LINE_END.sub(b"\r\n", message)


def envelope_sender(message: bytes) -> str:
    """The C{Return-Path} address of C{message} (its header), or C{""} (the null sender)."""
    end = _HEADER_END.search(message)
    header = message[:end.start() + 2] if end is not None else message
    m = _RETURN_PATH.search(header)
    if m is None:
        return ""
    address = m.group(1).strip()
    if not address.isascii() or any(c <= 0x20 or c == 0x7F for c in address):
        return ""
    return address.decode("ascii")


class _Message:
    """A message being received: its chunks (CRLF line ends, unstuffed)."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())


class ForwardTarget(Target):
    """
    Hand each message to an LMTP or SMTP server (see the module docstring).
    One connection serves a whole run: opened at the first message, QUIT at
    L{close}, dropped by L{disconnect} after a failure.
    """

    immediate = True
    #: received as CRLF: the form it is sent in
    crlf = True

    def __init__(self, protocol: str, address: str | tuple[str, int], recipients: Sequence[str], *,
                 timeout: float = 60.0, warn: Callable[[str], None] = print,
                 local_hostname: str | None = None) -> None:
        if protocol not in ("lmtp", "smtp"):
            raise ValueError(f"protocol must be lmtp or smtp, not {protocol!r}")
        if not recipients:
            raise ValueError(f"{protocol}: forwarding needs at least one recipient")
        for rcpt in recipients:
            if not rcpt or any(c in rcpt for c in "<>\r\n\t ") or not rcpt.isprintable():
                raise ValueError(f"not a recipient address: {rcpt!r}")
        self.protocol = protocol
        self.address = address
        self.recipients = list(recipients)
        self.timeout = timeout
        self.warn = warn
        #: the name in LHLO/EHLO (by default the host name, without smtplib's DNS lookup)
        self.local_hostname = local_hostname or socket.gethostname() or "localhost"
        where = address if isinstance(address, str) else (
            f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}")
        self.description = f"{protocol}:{where}"
        self._client: Any = None
        self._journal: Journal | None = None

    # -- the Target protocol ------------------------------------------------

    def recover(self, journal: Journal) -> None:
        self._journal = journal
        for uid in sorted(journal.mda_unknown):
            self.warn(f"the delivery of {uid} was interrupted (it may have been accepted): "
                      "it will be sent again (possible duplicate)")

    def open(self, uid: str, size: int) -> _Message:
        return _Message()

    def finished(self, writer: _Message) -> int:
        return writer.size

    def abort(self, writer: _Message) -> None:
        writer.chunks = []

    def deliver(self, uid: str, writer: _Message) -> None:
        assert self._journal is not None
        data = wire_form(b"".join(writer.chunks))
        writer.chunks = []
        self._journal.append([f"I {uid}"], sync=False)
        refusal = self._send(uid, data)
        if refusal is not None:
            self._journal.append([f"X {uid}"], sync=False)
            raise refusal

    def prepare(self, writers: list[Any]) -> None:
        pass

    def commit(self, journal: Journal, uids: list[str], writers: list[Any]) -> None:
        journal.append([f"D {u}" for u in uids])
        journal.delivered.update(uids)

    def close(self) -> None:
        """End the session politely (QUIT)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.quit()
            with contextlib.suppress(Exception):
                client.close()

    def disconnect(self) -> None:
        """Drop the connection without QUIT (after a failure: an open transaction is abandoned)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    # -- the conversation ---------------------------------------------------

    def _fail(self, text: str, code: int | None = None) -> ForwardError:
        self.disconnect()
        temporary = code is None or not 500 <= code < 600
        return ForwardError(f"{self.description}: {text}", temporary)

    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        import smtplib

        cls = smtplib.LMTP if self.protocol == "lmtp" else smtplib.SMTP
        client = cls(local_hostname=self.local_hostname, timeout=self.timeout)
        self._client = client
        try:
            if isinstance(self.address, str):
                code, text = client.connect(self.address)
            else:
                code, text = client.connect(self.address[0], self.address[1])
            if code != 220:
                raise self._fail(f"greeting: {code} {_text(text)}", code)
            code, text = client.ehlo()
            if code != 250 and self.protocol == "smtp":
                code, text = client.helo()
            if code != 250:
                verb = "LHLO" if self.protocol == "lmtp" else "EHLO/HELO"
                raise self._fail(f"{verb} refused: {code} {_text(text)}", code)
        except (OSError, smtplib.SMTPException) as e:
            raise self._fail(f"cannot connect: {_network_text(e)}") from e
        return client

    def _send(self, uid: str, data: bytes) -> MessageRefused | None:
        """One transaction; a refusal is returned, a broken connection raised (L{ForwardError})."""
        import smtplib

        client = self._connect()
        try:
            return self._transaction(client, uid, data)
        except (OSError, smtplib.SMTPException) as e:
            raise self._fail(f"connection lost while sending message {uid}: {_network_text(e)}") from e

    def _transaction(self, client: Any, uid: str, data: bytes) -> MessageRefused | None:
        import smtplib

        options = []
        if client.has_extn("size"):
            options.append(f"SIZE={len(data)}")
        if client.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        code, text = client.mail(envelope_sender(data), options)
        if code != 250:
            return self._refused(client, uid, "MAIL FROM", [(None, code, text)], reset=True)
        refused: list[tuple[str | None, int, Any]] = []
        for rcpt in self.recipients:
            code, text = client.rcpt(rcpt)
            if code not in (250, 251):
                refused.append((rcpt, code, text))
        if refused:
            return self._refused(client, uid, "RCPT TO", refused, reset=True)
        try:
            code, text = client.data(data)
        except smtplib.SMTPDataError as e:  # no 354
            return self._refused(client, uid, "DATA", [(None, e.smtp_code, e.smtp_error)], reset=True)
        if self.protocol == "lmtp":
            replies: list[tuple[str | None, int, Any]] = [(self.recipients[0], code, text)]
            for rcpt in self.recipients[1:]:
                code, text = client.getreply()
                replies.append((rcpt, code, text))
        else:
            replies = [(None, code, text)]
        bad = [r for r in replies if not 200 <= r[1] < 300]
        if not bad:
            return None
        accepted = [r[0] for r in replies if 200 <= r[1] < 300 and r[0] is not None]
        return self._refused(client, uid, "the end of DATA", bad, accepted=accepted)

    def _refused(self, client: Any, uid: str, stage: str, replies: list[tuple[str | None, int, Any]],
                 reset: bool = False, accepted: Sequence[str] = ()) -> MessageRefused:
        for _rcpt, code, text in replies:
            if code == 421 or code < 200:  # closing the connection, or a reply that is not one
                raise self._fail(f"at {stage} for message {uid}: {code} {_text(text)}", 421)
        if reset:
            try:
                client.rset()
            except Exception:
                self.disconnect()  # the next message connects again
        what = "; ".join((f"<{rcpt}> " if rcpt else "") + f"{code} {_text(text)}"
                         for rcpt, code, text in replies)
        text = f"{self.description} refused message {uid} at {stage}: {what}"
        if accepted:
            text += (" (accepted for " + ", ".join(f"<{a}>" for a in accepted)
                     + ", who get it again at the retry)")
        return MessageRefused(text, temporary=any(400 <= code < 500 for _, code, _ in replies))


def _network_text(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, FileNotFoundError):
        return "no such socket"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


def make_forward_target(spec: str, *, recipients: Sequence[str] = (), timeout: float = 60.0,
                        warn: Callable[[str], None] = print) -> ForwardTarget:
    """
    A L{ForwardTarget} from C{lmtp:...} or C{smtp:...}.  LMTP's recipient is
    by default the local user name (the user running the fetch, as fetchmail
    does; a bare local part, which LMTP servers take as the mailbox name);
    SMTP needs recipients.
    """
    protocol, address = parse_forward_spec(spec)
    if not recipients:
        if protocol == "smtp":
            raise ValueError("smtp: forwarding needs a recipient address (--recipient ADDR)")
        import getpass

        recipients = [getpass.getuser()]
    return ForwardTarget(protocol, address, recipients, timeout=timeout, warn=warn)
