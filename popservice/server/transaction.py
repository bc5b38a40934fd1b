"""
The TRANSACTION state of a connection (RFC 1939 section 5): opening the
session from the portal's answer (RFC 2449 EXPIRE and LOGIN-DELAY), one
handler per TRANSACTION command, QUIT into UPDATE (RFC 1939 section 6), and
releasing the mailbox at the end of the session, whatever its outcome.

The numbering, deletion marks and UPDATE itself are L{MailboxSession}'s
(L{popservice.server.session}); bodies stream through
L{popservice.server.transfer}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from popservice import wire
from popservice.interfaces import IExpiringMailbox, IMailbox, IWatchedMailbox, MessageInfo
from popservice.server.capa import capabilities
from popservice.server.config import expire_days, login_delay
from popservice.server.i18n import lang_response
from popservice.server.session import MailboxSession
from popservice.server.shell import Shell
from popservice.server.transfer import send_message
from popservice.states import State
from popservice.stores.twistedmail import TwistedMailboxAdapter

log = Logger()


def open_session(shell: Shell, result: tuple[Any, Any, Callable[[], None]], name: str,
                 method: str = "USER") -> "defer.Deferred[MailboxSession | None]":
    """
    The portal's answer for C{name} becomes a session: a twisted.mail avatar
    is adapted, RFC 2449 EXPIRE removes what expired, the listing is frozen,
    and LOGIN-DELAY is enforced (after the credentials, RFC 2449 section
    8.1.1: then C{None}, the refusal already answered).  C{method} (USER,
    APOP, a SASL mechanism) is only reported, with a LOGIN-DELAY refusal.
    """
    interface, avatar, logout = result
    mailbox: IMailbox
    if interface is IMailbox:
        mailbox = avatar
    else:
        mailbox = TwistedMailboxAdapter(avatar, logout)
    hub = shell.factory
    d: defer.Deferred[Any] = defer.succeed(None)
    days = expire_days(hub, name)
    if days and IExpiringMailbox.providedBy(mailbox):
        # RFC 2449 EXPIRE n: messages retrieved n days ago go before the listing is frozen.
        expiring: IExpiringMailbox = mailbox

        def expired(count: int) -> None:
            if count:
                shell.event("expired", attempted=name, count=count)

        d.addCallback(lambda _: expiring.expire(days, hub.clock.seconds()))
        d.addCallback(expired)
    d.addCallback(lambda _: mailbox.listing())

    def failed(f: Failure) -> Failure:
        defer.maybeDeferred(mailbox.close)
        return f

    def listed(listing: Sequence[MessageInfo]) -> MailboxSession | None:
        # Every store hands over a sequence nobody modifies (IMailbox.listing): no copy per session.
        session = MailboxSession(mailbox, listing if isinstance(listing, Sequence) else list(listing))
        if shell.closed:
            # The client went away while we opened the mailbox.
            defer.maybeDeferred(mailbox.close)
            return None
        now = hub.clock.seconds()
        delay = login_delay(hub, name)
        last = hub.last_login.get(name)
        if delay > 0 and last is not None and now - last < delay:
            defer.maybeDeferred(mailbox.close)
            shell.event("login_delay", attempted=name, wait=int(delay - (now - last)), method=method)
            shell.reply(wire.err("Minimum time between logins not reached", "LOGIN-DELAY"))
            return None
        if delay > 0:
            # (kept only for users with a delay: no entry per user who ever logged in otherwise)
            hub.last_login[name] = now
        return session

    d.addCallbacks(listed, failed)
    return d


class Transaction:
    """
    The TRANSACTION state of one connection (RFC 1939 section 5): one
    C{do_KEYWORD} method per command the table allows here; QUIT enters UPDATE.
    """

    __slots__ = ("shell", "session", "released")

    def __init__(self, shell: Shell, session: MailboxSession) -> None:
        self.shell = shell
        self.session = session
        #: the mailbox was released (UPDATE done, connection lost or taken over)
        self.released = False
        if IWatchedMailbox.providedBy(session.mailbox):
            # A lease shared with other hosts: it reports our idleness and can end us.
            watched: IWatchedMailbox = session.mailbox
            watched.watch(shell.idle_seconds, shell.terminate)

    def do_CAPA(self, command: wire.Command) -> bytes:
        """RFC 2449 section 5: CAPA after login."""
        return capabilities(self.shell.factory, self.shell.user, True).response(True)

    def do_LANG(self, command: wire.Command) -> bytes:
        """RFC 6856 section 4: list the languages, or choose one for response texts."""
        response, self.shell.language = lang_response(
            str(command.args[0]) if command.args else None, self.shell.language)
        return response

    def do_STAT(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: STAT."""
        return self.session.stat()

    def do_LIST(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: LIST [msg]."""
        return self.session.list(int(command.args[0]) if command.args else None)

    def do_UIDL(self, command: wire.Command) -> bytes:
        """RFC 1939 section 7: UIDL [msg]."""
        return self.session.uidl(int(command.args[0]) if command.args else None)

    def do_DELE(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: DELE msg."""
        return self.session.dele(int(command.args[0]))

    def do_RSET(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: RSET."""
        return self.session.rset()

    def do_NOOP(self, command: wire.Command) -> bytes:
        """RFC 1939 section 5: NOOP."""
        return wire.ok()

    def do_RETR(self, command: wire.Command) -> bytes | None:
        """RFC 1939 section 5: RETR msg, streamed."""
        return send_message(self.shell, self.session, int(command.args[0]), None)

    def do_TOP(self, command: wire.Command) -> bytes | None:
        """RFC 1939 section 7: TOP msg n."""
        return send_message(self.shell, self.session, int(command.args[0]), int(command.args[1]))

    def do_QUIT(self, command: wire.Command) -> None:
        """RFC 1939 section 6: QUIT enters UPDATE; the lock is released before the answer."""
        shell, session = self.shell, self.session
        shell.state = State.UPDATE
        shell.wait()
        if expire_days(shell.factory, shell.user) == 0:
            # RFC 2449 EXPIRE 0: a message may not be left on the server once retrieved.
            session.deleted |= session.retrieved

        def failed(failure: Failure) -> bytes:
            log.failure("UPDATE failed for {user}", failure, user=shell.user)
            shell.event("update_failed")
            return wire.err("Deleting messages failed", "SYS/TEMP")

        d = session.update().addErrback(failed)

        def answer(response: bytes) -> "defer.Deferred[None]":
            def after(_: object) -> None:
                shell.reply(response)
                shell.close("quit")

            return shell.release_mailbox().addCallback(after)

        d.addCallback(answer)

    def release(self) -> "defer.Deferred[Any]":
        """
        End of the session, whatever its outcome: record first retrievals
        (RFC 2449 EXPIRE counts from them) and close the mailbox.  Once only.
        """
        if self.released:
            return defer.succeed(None)
        self.released = True
        session = self.session
        shell = self.shell
        d: defer.Deferred[Any] = defer.succeed(None)
        retrieved = sorted(session.retrieved - session.deleted if session.updated else session.retrieved)
        expiring = bool(expire_days(shell.factory, shell.user))
        if retrieved and expiring and IExpiringMailbox.providedBy(session.mailbox):
            # RFC 2449 EXPIRE n counts from the first retrieval, finished session or not.
            mailbox: IExpiringMailbox = session.mailbox
            d.addCallback(lambda _: mailbox.record_retrieved(retrieved, shell.factory.clock.seconds()))
        d.addCallback(lambda _: session.mailbox.close())
        d.addErrback(lambda f: log.failure("closing mailbox failed", f))
        return d
