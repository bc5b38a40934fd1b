"""
The cred realm: an authenticated user name becomes an opened, locked mailbox.

Also the in-process registry of live sessions that lets a new login take a
mailbox over from a session that has sat idle past a grace period (a dropped
mobile connection), instead of answering [IN-USE] until the old one times out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface, implementer

from popservice.interfaces import IMailbox, IMailStore, IUserDirectory, MailboxInUse


class SessionHandle(Protocol):
    """What the registry needs of a live session."""

    def idle_seconds(self) -> float: ...

    def terminate(self, reason: str) -> "defer.Deferred[None]":
        """End the session without UPDATE and release its mailbox."""
        ...


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

    def __init__(self, store: IMailStore, directory: IUserDirectory | None = None,
                 registry: SessionRegistry | None = None) -> None:
        self.store = store
        self.directory = directory
        self.registry = registry if registry is not None else SessionRegistry()

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any
                      ) -> "defer.Deferred[tuple[type[Interface], object, Callable[[], None]]]":
        if IMailbox not in interfaces:
            raise NotImplementedError("MailRealm only provides popservice IMailbox")
        user = avatar_name(avatarId)
        home = self.directory.home(user) if self.directory is not None else None

        def opened(mailbox: IMailbox) -> tuple[type[Interface], object, Callable[[], None]]:
            return (IMailbox, mailbox, lambda: None)

        def open_mailbox(_: None) -> "defer.Deferred[IMailbox]":
            return self.store.open_mailbox(user, home)

        return self.registry.claim(user).addCallback(open_mailbox).addCallback(opened)
