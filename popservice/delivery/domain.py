"""
A twisted.mail delivery domain (L{twisted.mail.interfaces.IDomain}) over any
L{IMailDelivery} store, so twisted.mail's own SMTP/ESMTP server
(L{twisted.mail.mail.MailService}, L{twisted.mail.protocols.ESMTPFactory})
delivers into the mailboxes popservice serves::

    mail_service = mail.MailService()
    mail_service.addDomain(b"example.org", DeliveryDomain(MaildirStore("/srv/mail/%u")))

RCPT asks the store whether the user exists (L{IMailDelivery.exists}): an
unknown user gets 550, a store that cannot tell now 451.  At the end of the
message the store is given the message with the idempotency key of
L{popservice.delivery.key}, computed without the C{Received:} field the SMTP
server put first (it carries the time of the attempt, so a retried message
still has the same key).

Twisted's SMTP server answers a failed delivery with one 550 whatever the
failure (L{twisted.mail.smtp.SMTP._messageHandled}); use the LMTP server
(L{popservice.delivery.lmtp}) where temporary failures must stay temporary.

Users come from the store, not from this domain: L{addUser} is not
supported, and L{requestAvatar} serves no mailboxes (popservice's POP3 server
does that, over the same store).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IDomain
from twisted.python.failure import Failure
from zope.interface import implementer

from popservice.delivery.common import Trouble, classify, local_part_user
from popservice.delivery.key import delivery_key
from popservice.interfaces import IMailDelivery, IUserDirectory

__all__ = ["DeliveryDomain", "DeliveryMessage"]

log = Logger(namespace="popservice.delivery.domain")

#: Messages beyond this many octets are refused at the end of DATA (Twisted's server has no SIZE).
DEFAULT_MAX_SIZE = 50 * 1024 * 1024


@implementer(smtp.IMessage)
class DeliveryMessage:
    """One message for one user, received line by line from Twisted's SMTP server."""

    def __init__(self, store: IMailDelivery, user: str, home: str | None, max_size: int) -> None:
        self.store = store
        self.user = user
        self.home = home
        self.max_size = max_size
        self.trace: bytes | None = None
        self.lines: list[bytes] = []
        self.size = 0
        self.too_big = False

    def lineReceived(self, line: bytes) -> None:
        if self.trace is None and not self.lines and line.startswith(b"Received:"):
            self.trace = line  # this hop's trace field: stored, but not part of the key
            return
        self.size += len(line) + 1
        if self.too_big or self.size > self.max_size:
            self.too_big = True
            self.lines = []
            return
        self.lines.append(line)

    def eomReceived(self) -> "defer.Deferred[bytes]":
        if self.too_big:
            return defer.fail(smtp.SMTPServerError(552, "Message size exceeds the limit"))
        body = b"\n".join(self.lines) + b"\n"
        self.lines = []
        message = body if self.trace is None else self.trace + b"\n" + body

        def stored(new: bool) -> bytes:
            log.info("SMTP: {outcome} message for {user}", outcome="stored" if new else "already had",
                     user=self.user)
            return b"stored" if new else b"already stored"

        def failed(failure: Failure) -> Failure:
            trouble = classify(failure.value)
            if trouble is Trouble.UNEXPECTED:
                log.failure("SMTP: delivery to {user} failed", failure, user=self.user)
            else:
                log.warn("SMTP: delivery to {user} failed: {why}", user=self.user, why=trouble.value)
            return failure

        d: defer.Deferred[bool] = defer.maybeDeferred(self.store.deliver, self.user, self.home, message,
                                                      delivery_key(body))
        return d.addCallbacks(stored, failed)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(IDomain)
class DeliveryDomain:
    """
    A mail domain whose users are the mailboxes of C{store}.

    @param directory: home directories for stores with C{~} paths.
    @param user_for_address: C{(local, domain) -> user name or None} (default:
        the local part).
    """

    def __init__(self, store: IMailDelivery, directory: IUserDirectory | None = None, *,
                 max_size: int = DEFAULT_MAX_SIZE,
                 user_for_address: Callable[[bytes, bytes], str | None] = local_part_user) -> None:
        if not IMailDelivery.providedBy(store):
            raise TypeError("%r does not provide IMailDelivery" % (store,))
        self.store = store
        self.directory = directory
        self.max_size = max_size
        self.user_for_address = user_for_address

    def exists(self, user: smtp.User, memo: object = None) -> "defer.Deferred[Callable[[], DeliveryMessage]]":
        """
        A Deferred firing with the message factory for C{user}, failing with
        L{smtp.SMTPBadRcpt} (unknown user) or L{smtp.SMTPServerError} 451.
        Twisted's L{twisted.mail.protocols.DomainDeliveryBase} accepts a Deferred here.
        """
        name = self.user_for_address(user.dest.local, user.dest.domain)
        if not name:
            return defer.fail(smtp.SMTPBadRcpt(user))
        try:
            home = self.directory.home(name) if self.directory is not None else None
        except Exception:
            log.failure("looking up the home of {user}", user=name)
            return defer.fail(smtp.SMTPServerError(451, "Temporary failure looking up the user"))

        def checked(exists: bool) -> Callable[[], DeliveryMessage]:
            if not exists:
                raise smtp.SMTPBadRcpt(user)
            return lambda: DeliveryMessage(self.store, name, home, self.max_size)

        def failed(failure: Failure) -> Callable[[], DeliveryMessage]:
            trouble = classify(failure.value)
            if trouble is Trouble.NO_MAILBOX:
                raise smtp.SMTPBadRcpt(user)
            if trouble is Trouble.UNEXPECTED:
                log.failure("checking recipient {user}", failure, user=name)
            raise smtp.SMTPServerError(451, "Mailbox temporarily unavailable, try again later")

        d: defer.Deferred[bool] = defer.maybeDeferred(self.store.exists, name, home)
        return d.addCallbacks(checked, failed)

    def addUser(self, user: bytes, password: bytes) -> None:
        raise NotImplementedError("users are the store's mailboxes (popservice passwd add --maildir)")

    def getCredentialsCheckers(self) -> list[Any]:
        return []

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        raise NotImplementedError("popservice's POP3 server serves these mailboxes")

    def willRelay(self, user: Any, protocol: Any) -> bool:
        return False
