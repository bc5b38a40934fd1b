"""
The cred realm: an authenticated user name becomes an opened, locked mailbox.

Also the in-process registry of live sessions that lets a new login take a
mailbox over from a session that has sat idle past a grace period (a dropped
mobile connection), instead of answering [IN-USE] until the old one times out.
When the store says another process holds the mailbox (L{MailboxInUse} with a
L{LockHolder}), the realm asks that process (L{IHolderRequests}, see
L{popservice.server.handoff}) to end its session if it is idle past its own
grace, and opens the mailbox once it lets go.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.cred.portal import IRealm
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from popservice.interfaces import IMailbox, IMailStore, IUserDirectory, LockHolder, MailboxInUse

#: After a holder in another process let go: seconds to wait before each new try of the lock.
REOPEN_DELAYS = (0.0, 0.05, 0.15)


class SessionHandle(Protocol):
    """What the registry needs of a live session."""

    def idle_seconds(self) -> float: ...

    def terminate(self, reason: str, *, cross_process: bool = False,
                  by_pid: int | None = None) -> "defer.Deferred[None]":
        """
        End the session without UPDATE and release its mailbox (its
        C{takeover} event says whether a login in another process, C{by_pid},
        took it).
        """
        ...


class IHolderRequests(Interface):
    """Asks the process holding a mailbox lock to let an idle session go."""

    def ask(holder: LockHolder, user: str) -> "defer.Deferred[bool]":
        """
        Ask C{holder} to end C{user}'s session if it has been idle past its
        grace.  Fires C{True} once that session has ended and released the
        lock, C{False} when it has not (active, unknown, the holder cannot be
        reached or does not answer in time); never fails.
        """


class SessionRegistry:
    """
    Live sessions by user, in this process.  A lock held by another process is
    still found by the store's own lock (and answered with [IN-USE]).
    """

    log = Logger()

    def __init__(self, grace: float = 60.0, enabled: bool = True, max_sessions: int = 10) -> None:
        self.grace = grace
        #: exclusive sessions (one per mailbox, idle ones taken over)
        self.enabled = enabled
        #: without exclusive locking, at most this many sessions per user
        self.max_sessions = max_sessions
        self._sessions: dict[str, SessionHandle] = {}
        self._counts: dict[str, int] = {}

    def claim(self, user: str) -> "defer.Deferred[None]":
        """
        Fires when C{user}'s mailbox may be opened; fails with L{MailboxInUse}
        when an active session holds it.
        """
        if not self.enabled:
            if self._counts.get(user, 0) >= self.max_sessions:
                return defer.fail(MailboxInUse(user))
            return defer.succeed(None)
        holder = self._sessions.get(user)
        if holder is None:
            return defer.succeed(None)
        if holder.idle_seconds() < self.grace:
            return defer.fail(MailboxInUse(user))
        self.log.info("taking over mailbox of {user} from a session idle {idle:.0f}s",
                      user=user, idle=holder.idle_seconds())
        self._sessions.pop(user, None)
        return holder.terminate("taken over by a new login")

    def release_idle(self, user: str, requester: int) -> "defer.Deferred[bool]":
        """
        A login in process C{requester} found C{user}'s mailbox locked by this
        process: end the session if it has been idle past the grace.  Fires
        C{True} once it has ended without UPDATE and released its mailbox,
        C{False} when there is no such session here or it is active.
        """
        holder = self._sessions.get(user) if self.enabled else None
        if holder is None:
            return defer.succeed(False)
        idle = holder.idle_seconds()
        if idle < self.grace:
            return defer.succeed(False)
        self.log.info("process {requester} takes over mailbox of {user} from a session idle {idle:.0f}s",
                      requester=requester, user=user, idle=idle)
        self._sessions.pop(user, None)
        d = holder.terminate("taken over by a login in process %d" % (requester,), cross_process=True,
                             by_pid=requester)
        return d.addCallback(lambda _: True)

    def register(self, user: str, session: SessionHandle) -> None:
        """Call once per logged-in session; L{unregister} exactly once at its end."""
        if self.enabled:
            self._sessions[user] = session
        else:
            self._counts[user] = self._counts.get(user, 0) + 1

    def unregister(self, user: str, session: SessionHandle) -> None:
        if self.enabled:
            if self._sessions.get(user) is session:
                del self._sessions[user]
            return
        left = self._counts.get(user, 0) - 1
        if left > 0:
            self._counts[user] = left
        else:
            self._counts.pop(user, None)

    def __len__(self) -> int:
        return len(self._sessions)


def avatar_name(avatar_id: object) -> str:
    """Checkers return str or bytes avatar ids (Twisted's own return bytes)."""
    if isinstance(avatar_id, bytes):
        return avatar_id.decode("utf-8")
    if isinstance(avatar_id, str):
        return avatar_id
    raise TypeError("unsupported avatar id")


@implementer(IRealm)
class MailRealm:
    """
    A realm serving popservice mailboxes from an L{IMailStore}.  When a checker
    also knows home directories (L{IUserDirectory}), C{~} in store paths works.
    """

    log = Logger()

    def __init__(self, store: IMailStore, directory: IUserDirectory | None = None,
                 registry: SessionRegistry | None = None, holders: IHolderRequests | None = None,
                 clock: IReactorTime | None = None) -> None:
        self.store = store
        self.directory = directory
        self.registry = registry if registry is not None else SessionRegistry()
        #: asks another process holding a mailbox to let an idle session go (None: never asked)
        self.holders = holders
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock: IReactorTime = clock

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any
                      ) -> "defer.Deferred[tuple[type[Interface], object, Callable[[], None]]]":
        if IMailbox not in interfaces:
            raise NotImplementedError("MailRealm only provides popservice IMailbox")
        user = avatar_name(avatarId)
        home = self.directory.home(user) if self.directory is not None else None

        def opened(mailbox: IMailbox) -> tuple[type[Interface], object, Callable[[], None]]:
            return (IMailbox, mailbox, lambda: None)

        return defer.Deferred.fromCoroutine(self._open(user, home)).addCallback(opened)

    async def _open(self, user: str, home: str | None) -> IMailbox:
        await self.registry.claim(user)
        try:
            return await self.store.open_mailbox(user, home)
        except MailboxInUse as e:
            holder = e.holder
            if self.holders is None or holder is None or holder.control is None:
                raise
            if not await self.holders.ask(holder, holder.user or user):
                raise
            in_use, released_by = e, holder.pid
        # The holder ended its session and released the lock before answering; another login may
        # still win the race for it.
        for delay in REOPEN_DELAYS:
            if delay:
                await task.deferLater(self.clock, delay, lambda: None)
            try:
                return await self.store.open_mailbox(user, home)
            except MailboxInUse as e:
                in_use = e
        self.log.info("mailbox of {user} released by process {pid} but taken by another login",
                      user=user, pid=released_by)
        raise in_use
