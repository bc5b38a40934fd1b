"""
The connection as the state objects see it.

L{popservice.server.protocol.POP3ServerProtocol} is the thin Twisted shell of
a connection: it turns bytes into commands through the table, writes
answers, owns the timers and flow control.  What it does for the objects of
each state (L{popservice.server.login.Authorization} before login,
L{popservice.server.session.Transaction} after) is this L{Shell} protocol:
they are typed against it, so neither imports the shell, and the login object
can be driven in a unit test by any object with these members.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer

from popservice.server.config import ServerHub
from popservice.states import State


class Shell(Protocol):
    factory: ServerHub
    #: the peer's address (None for UNIX sockets)
    peer_host: str | None
    #: the connection is encrypted (implicit TLS or after STLS)
    tls: bool
    #: RFC 6856: UTF8 mode, and the language of response texts
    utf8: bool
    language: str
    #: the logged-in user (None before login)
    user: str | None
    #: the RFC 1939 state (the command table is read for it)
    state: State

    @property
    def closed(self) -> bool:
        """The connection is gone."""
        ...

    def reply(self, response: bytes) -> None:
        """Write a response, its status text in the session's language."""
        ...

    def write(self, data: bytes) -> None:
        """Write bytes as they are (SASL challenges, message bodies)."""
        ...

    def wait(self) -> None:
        """Answer no further command until L{proceed}: an answer is on its way."""
        ...

    def proceed(self) -> None:
        """The pending answer is out: go on with the commands already received."""
        ...

    def bad_command(self, response: bytes) -> None:
        """Answer an invalid command; too many of them close the connection."""
        ...

    def close(self, reason: str) -> None:
        """Close after what is written; nothing more is read."""
        ...

    def internal_error(self, failure: Any) -> None:
        """Log C{failure}, answer C{-ERR [SYS/TEMP]} and close."""
        ...

    def event(self, name: str, **fields: object) -> None:
        """A session event for the observers (logs, metrics)."""
        ...

    def touch(self) -> None:
        """Note activity (the idle timer)."""
        ...

    def start_tls(self) -> None:
        """RFC 2595: switch the transport to TLS; buffered plaintext input is discarded."""
        ...

    def peer_certificate(self) -> Any:
        """The client's TLS certificate (an OpenSSL X509), or None."""
        ...

    def authenticated(self, result: tuple[Any, Any, Any], name: str) -> "defer.Deferred[None]":
        """
        The portal logged C{name} in with C{result} (interface, avatar,
        logout): open the session.  Fails like a login would (in use,
        unavailable) when the mailbox cannot be opened.
        """
        ...

    def idle_seconds(self) -> float:
        """Seconds since the client's last command."""
        ...

    def terminate(self, reason: str) -> "defer.Deferred[None]":
        """End the session now, without UPDATE (taken over, lock lost)."""
        ...

    def release_mailbox(self) -> "defer.Deferred[Any]":
        """End the session's hold on its mailbox (registry, lock, EXPIRE records); once."""
        ...

    def send_body(self, transfer: Any) -> None:
        """Stream a message body (L{popservice.server.transfer.MessageTransfer})."""
        ...
