"""
AUTHORIZATION state (RFC 1939 section 4): the greeting and its APOP
timestamp, CAPA, STLS (RFC 2595), USER/PASS and APOP (RFC 1939 section 7),
AUTH (RFC 5034), UTF8 and LANG (RFC 6856), QUIT, and the policy checks that
come with them (plaintext passwords only over TLS or from trusted peers,
failure delays, the failure limit).

This module cannot reach a mailbox: it imports no store and no session code.
A login ends in credentials for the portal; the portal's result is handed to
the shell (L{Shell.authenticated}), which opens the session.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import re
import secrets
from typing import Any, cast

from scramp.utils import saslprep
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import pop3 as twisted_pop3
from twisted.python.failure import Failure

from popservice import wire
from popservice.auth.credentials import APOPCredentials, PlainCredentials
from popservice.interfaces import IMailbox, MailboxForbidden, MailboxInUse, MailboxUnavailable
from popservice.sasl.base import (
    Authenticated,
    Challenge,
    ISASLServerMechanism,
    MechanismFactory,
    SASLContext,
    SASLStep,
)
from popservice.server.capa import Capabilities, capabilities
from popservice.server.i18n import lang_response
from popservice.server.shell import Shell

_counter = itertools.count(1)
_UNSAFE_HOST = re.compile(r"[^A-Za-z0-9.-]")

#: RFC 5034 section 4: SASL responses may be longer than commands (OAuth tokens).
SASL_LINE = 16384

_USE_STLS = "Plaintext authentication disallowed on non-secure connections, use STLS"


def apop_timestamp(hostname: str) -> str:
    """
    A greeting timestamp unique to this connection (RFC 1939 section 7),
    made only of C{[A-Za-z0-9.@_+/-]} so strict clients (mpop) accept it.
    """
    host = _UNSAFE_HOST.sub("", hostname)[:64] or "localhost"
    return "<%d.%d.%s@%s>" % (os.getpid(), next(_counter), secrets.token_hex(6), host)


def decode_sasl(text: str) -> bytes | None:
    """Strict base64 of a SASL response; C{=} is the empty response (RFC 5034)."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


class Authorization:
    """
    The AUTHORIZATION state of one connection: one C{do_KEYWORD} method per
    command the table allows here, each answering C{bytes} or C{None} (the
    answer comes later, through the shell).
    """

    __slots__ = ("shell", "timestamp", "user", "failures", "method", "_sasl", "sasl_pending")

    log = Logger()

    def __init__(self, shell: Shell, timestamp: str | None) -> None:
        self.shell = shell
        #: the greeting's APOP timestamp (None: APOP not offered)
        self.timestamp = timestamp
        #: the name of a USER command awaiting its PASS
        self.user: bytes | None = None
        self.failures = 0
        #: the login method of the last attempt (USER, APOP, a SASL mechanism)
        self.method = "USER"
        self._sasl: ISASLServerMechanism | None = None
        #: an AUTH exchange waits for the client's next response line
        self.sasl_pending = False

    # -- helpers

    def greeting(self, hostname: str) -> bytes:
        text = "POP3 server ready"
        if self.timestamp:
            text += " " + self.timestamp
        return wire.ok(text)

    def plaintext_allowed(self) -> bool:
        return self.shell.factory.config.policy.plaintext_allowed(self.shell.peer_host, self.shell.tls)

    def mechanisms(self) -> dict[str, MechanismFactory]:
        """The SASL mechanisms usable on this connection (plaintext ones need TLS or trust)."""
        allowed = self.plaintext_allowed()
        return {name: factory for name, factory in self.shell.factory.config.sasl.items()
                if allowed or not getattr(factory, "plaintext", False)}

    def capabilities(self) -> Capabilities:
        shell = self.shell
        return capabilities(shell.factory, None, False, plaintext=self.plaintext_allowed(),
                            stls=shell.factory.config.tls_context is not None and not shell.tls,
                            sasl=tuple(self.mechanisms()))

    def _prepare(self, text: str) -> str | None:
        """In UTF8 mode, user names and passwords are SASLprep-ed (RFC 6856 section 3, RFC 4013)."""
        if not self.shell.utf8:
            return text
        try:
            return str(saslprep(text))
        except (ValueError, UnicodeError):
            return None

    # -- commands

    def do_CAPA(self, command: wire.Command) -> bytes:
        """RFC 2449 section 5: CAPA."""
        return self.capabilities().response(False)

    def do_QUIT(self, command: wire.Command) -> None:
        """RFC 1939 section 4: QUIT before login just closes."""
        self.shell.reply(wire.ok("Bye"))
        self.shell.close("quit")

    def do_USER(self, command: wire.Command) -> bytes:
        """RFC 1939 section 7: USER name; the answer reveals nothing."""
        if not self.plaintext_allowed():
            return wire.err(_USE_STLS, "AUTH")
        name = self._prepare(str(command.args[0]))
        if name is None:
            return wire.err("Invalid characters in argument")
        self.user = name.encode("utf-8", "surrogateescape")
        return wire.ok("Send your password")

    def do_PASS(self, command: wire.Command) -> bytes | None:
        """RFC 1939 section 7: PASS string, only right after USER."""
        if not self.plaintext_allowed():
            return wire.err(_USE_STLS, "AUTH")
        password = self._prepare(str(command.args[0]))
        if password is None:
            self.user = None
            return wire.err("Invalid characters in argument")
        if self.user is None:
            return wire.err("Send USER first")
        user, self.user = self.user, None
        self._login(PlainCredentials(user, password.encode("utf-8", "surrogateescape")), user)
        return None

    def do_APOP(self, command: wire.Command) -> bytes | None:
        """RFC 1939 section 7: APOP name digest."""
        name, digest = str(command.args[0]), str(command.args[1])
        self.user = None
        if not self.timestamp:
            return wire.err("APOP is not available", "AUTH")
        if not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
            return wire.err("Authentication failed", "AUTH")
        credentials = APOPCredentials(self.timestamp.encode("ascii"), name.encode("utf-8", "surrogateescape"),
                                      digest.lower().encode("ascii"))
        self._login(credentials, credentials.username, via="APOP")
        return None

    def do_AUTH(self, command: wire.Command) -> bytes | None:
        """RFC 5034 section 4: AUTH mechanism [initial-response]; bare AUTH lists mechanisms."""
        mechanisms = self.mechanisms()
        if not command.args:
            return wire.multiline(wire.ok("Mechanisms follow"), [m.encode("ascii") for m in mechanisms])
        name = str(command.args[0]).upper()
        factory = mechanisms.get(name)
        if factory is None:
            if name in self.shell.factory.config.sasl:
                return wire.err(_USE_STLS, "AUTH")
            return wire.err("Unsupported authentication mechanism")
        initial: bytes | None = None
        if len(command.args) > 1:
            decoded = decode_sasl(str(command.args[1]))
            if decoded is None:
                return wire.err("Invalid base64 data in initial response")
            initial = decoded
        self._sasl = factory(self._sasl_context())
        self._sasl_step(initial)
        return None

    def do_STLS(self, command: wire.Command) -> bytes | None:
        """RFC 2595 section 4: STLS, only once, only before login."""
        if self.shell.tls:
            return wire.err("Already using TLS")
        if self.shell.factory.config.tls_context is None:
            return wire.err("TLS is not available")
        self.shell.reply(wire.ok("Begin TLS negotiation now"))
        self.user = None
        self.shell.start_tls()
        return None

    def do_UTF8(self, command: wire.Command) -> bytes:
        """RFC 6856 section 3: UTF-8 user names and passwords (SASLprep) from now on."""
        self.shell.utf8 = True
        return wire.ok("UTF8 mode enabled")

    def do_LANG(self, command: wire.Command) -> bytes:
        """RFC 6856 section 4: list the languages, or choose one for response texts."""
        response, self.shell.language = lang_response(
            str(command.args[0]) if command.args else None, self.shell.language)
        return response

    # -- SASL (RFC 5034 section 4)

    def _sasl_context(self) -> SASLContext:
        config = self.shell.factory.config
        return SASLContext(hostname=config.hostname, tls=self.shell.tls, peer=self.shell.peer_host,
                           peer_certificate=self.shell.peer_certificate() if self.shell.tls else None,
                           checkers=self.shell.factory.all_checkers(), services=config.sasl_services)

    def sasl_line(self, line: bytes | wire.LineTooLong) -> None:
        """A client response inside an AUTH exchange."""
        if isinstance(line, wire.LineTooLong):
            self._end_sasl()
            self.shell.bad_command(wire.err("Authentication response too long", "AUTH"))
            return
        if line == b"*":
            self._end_sasl()
            self.shell.reply(wire.err("Authentication cancelled", "AUTH"))
            return
        decoded = decode_sasl(line.decode("ascii", "replace"))
        if decoded is None:
            self._end_sasl()
            self.shell.bad_command(wire.err("Invalid base64 data in response"))
            return
        self._sasl_step(decoded)

    def _end_sasl(self) -> None:
        self._sasl = None
        self.sasl_pending = False

    def _sasl_step(self, response: bytes | None) -> None:
        mechanism = self._sasl
        assert mechanism is not None
        self.shell.wait()
        self.sasl_pending = False
        d: defer.Deferred[Any] = defer.maybeDeferred(mechanism.step, response)
        d.addCallbacks(self._sasl_result, self._sasl_error)

    def _sasl_result(self, result: SASLStep) -> None:
        if self.shell.closed:
            return
        if isinstance(result, Challenge):
            self.sasl_pending = True
            self.shell.write(b"+ " + base64.b64encode(result.data) + wire.CRLF)
            self.shell.proceed()
            return
        name = getattr(self._sasl, "name", "SASL")
        self._end_sasl()
        if isinstance(result, Authenticated):
            username = getattr(result.credentials, "username", b"")
            if isinstance(username, str):
                username = username.encode("utf-8")
            self._login(result.credentials, username, via=name)
            return
        self._login_failed(Failure(UnauthorizedLogin(result.reason)), result.user or "", via=name)

    def _sasl_error(self, failure: Failure) -> None:
        self.log.failure("SASL mechanism failed", failure)
        self.shell.event("login_failed", attempted="", method=getattr(self._sasl, "name", "SASL"),
                         reason="internal")
        self._end_sasl()
        self.shell.reply(wire.err("Authentication failed", "SYS/TEMP"))
        self.shell.proceed()

    # -- the portal

    def _login(self, credentials: ICredentials, username: bytes, via: str = "USER") -> None:
        """Hand credentials to the portal; the shell opens the session with its answer."""
        self.shell.wait()
        self.method = via
        name = username.decode("utf-8", "replace")
        d: defer.Deferred[Any] = defer.maybeDeferred(
            self.shell.factory.portal.login, credentials, None, IMailbox, twisted_pop3.IMailbox)
        d.addCallback(self.shell.authenticated, name)
        d.addErrback(self._login_failed, name, via)
        d.addErrback(self.shell.internal_error)

    def _login_failed(self, failure: Failure, name: str, via: str = "USER") -> None:
        shell = self.shell
        if failure.check(UnauthorizedLogin):
            self.failures += 1
            hub = shell.factory
            ip_failures = hub.peers.failed(shell.peer_host or "", hub.clock.seconds())
            # The delay grows per failure on this connection and from this
            # address; a correct password is never delayed (no lock-out by others).
            delay = hub.config.policy.delay_after(max(self.failures, ip_failures))
            shell.event("login_failed", attempted=name, failures=self.failures, ip_failures=ip_failures,
                        method=via, reason="auth", delay=delay)
            if delay > 0:
                hub.clock.callLater(delay, self._answer_failed_login)
            else:
                self._answer_failed_login()
            return
        if failure.check(MailboxInUse):
            shell.event("login_failed", attempted=name, method=via, reason="in_use")
            shell.reply(wire.err("Mailbox is locked by another session", "IN-USE"))
        elif failure.check(MailboxForbidden):
            # Permanent until the operator acts: the one log line says what is wrong.
            self.log.warn("mailbox of {user} refused: {why}", user=name, why=failure.getErrorMessage())
            shell.event("login_failed", attempted=name, method=via, reason="unavailable")
            shell.reply(wire.err("Mailbox is not accessible", "SYS/PERM"))
        elif failure.check(MailboxUnavailable):
            self.log.warn("mailbox for {user} unavailable: {why}", user=name, why=failure.getErrorMessage())
            shell.event("login_failed", attempted=name, method=via, reason="unavailable")
            shell.reply(wire.err("Mailbox is unavailable", "SYS/TEMP"))
        else:
            self.log.failure("login of {user} failed", failure, user=name)
            shell.event("login_failed", attempted=name, method=via, reason="internal")
            shell.reply(wire.err("Internal server error", "SYS/TEMP"))
        shell.proceed()

    def _answer_failed_login(self) -> None:
        shell = self.shell
        if shell.closed:
            return
        shell.reply(wire.err("Authentication failed", "AUTH"))
        if self.failures >= shell.factory.config.policy.max_failures:
            shell.reply(wire.err("Too many failed logins, closing connection"))
            shell.close("too many failed logins")
            return
        shell.proceed()


class LoggedIn(Authorization):
    """
    What a logged-in connection keeps of its AUTHORIZATION state: the login
    method (for the logout line) and no SASL exchange pending.  One object
    per method, shared by every connection that logged in so (L{after_login}),
    so an idle session holds no state of its login.  It answers no command:
    after login the table sends every command to the TRANSACTION state.
    """

    __slots__ = ()

    def __init__(self, method: str) -> None:
        super().__init__(cast(Shell, None), None)
        self.method = method


_LOGGED_IN: dict[str, LoggedIn] = {}


def after_login(method: str) -> LoggedIn:
    """The shared L{LoggedIn} of C{method} (methods are the server's own names: a few)."""
    done = _LOGGED_IN.get(method)
    if done is None:
        done = _LOGGED_IN[method] = LoggedIn(method)
    return done


__all__ = ["SASL_LINE", "Authorization", "Capabilities", "LoggedIn", "PlainCredentials",
           "UnauthorizedLogin", "after_login", "apop_timestamp", "decode_sasl"]
