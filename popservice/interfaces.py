"""
The seams of popservice, as zope interfaces, and nothing else.

Every call that may touch a disk or a database returns a Deferred, so a
store backed by PostgreSQL (or anything slow) never blocks the reactor.

Beside each seam stand the plain values that cross it (L{MessageInfo}; the
answers of a SASL step: L{Challenge}, L{Authenticated}, L{Failed}), so that
both sides can name them without importing each other.  The SASL context and
the mechanism helpers live in L{popservice.sasl.base}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from twisted.internet.defer import Deferred


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a mailbox listing, frozen at login."""

    #: octets as transmitted: CRLF line ends, before byte-stuffing (RFC 1939 LIST)
    size: int
    #: RFC 1939 section 7: 1-70 characters in 0x21-0x7E, stable, never reused
    uid: str


@dataclass(frozen=True)
class LockHolder:
    """
    Who holds a mailbox lock, as the lock records it: a popservice process on
    this host (C{pid}, a random per-process C{token}), the path of that
    process's control socket (C{None}: it takes no requests) and the name its
    session registry knows the session by.
    """

    pid: int
    token: str
    control: "str | None"
    user: "str | None"


class MailboxInUse(Exception):
    """The mailbox is locked by another session (RFC 2449 [IN-USE])."""

    #: who holds it, when the lock records that (another process may be asked to let an idle session go)
    holder: "LockHolder | None" = None


class MailboxUnavailable(Exception):
    """The mailbox cannot be opened now (RFC 2449 [SYS/TEMP])."""


class MailboxForbidden(MailboxUnavailable):
    """
    The mailbox may never be opened as it is: it lies outside the mail root
    (a symbolic link) or belongs to another user (RFC 2449 [SYS/PERM]).
    """


class NoSuchMailbox(MailboxUnavailable):
    """The user has no mailbox in this store (delivery: a permanent failure, LMTP 550)."""


class MessageGone(Exception):
    """A message disappeared underneath the session (deleted by another process)."""


class IMessageStream(Interface):
    """The raw content of one message, read chunk by chunk."""

    def read() -> "Deferred[bytes]":
        """
        Return a Deferred firing with the next chunk of bytes, C{b""} at the end.
        Chunks may have any size and any line ends.
        """

    def close() -> None:
        """Release the stream (file handle, cursor).  Safe to call twice."""


class ISizedMessageStream(IMessageStream):
    """
    An L{IMessageStream} whose reader may size the next chunk: the server reads
    small chunks for a peer that is not keeping up (popservice.server.pacing).
    """

    chunk_size = Attribute("The most octets the next read() returns; the reader may change it.")


class IImmediateMessageStream(IMessageStream):
    """
    An L{IMessageStream} whose chunks are at hand (a local file): the server
    takes them with L{read_now}, without a Deferred per chunk.
    """

    def read_now() -> bytes:
        """
        The next chunk, C{b""} at the end; raises what C{read()}'s Deferred
        would fail with.
        """


class IMailbox(Interface):
    """
    A mailbox as a POP3 session sees it (popservice's own avatar interface).

    The listing is taken once, at login; numbering, sizes and UIDLs then stay
    fixed for the session.  Indices are 0-based positions in that listing.
    """

    def listing() -> "Deferred[Sequence[MessageInfo]]":
        """
        Deferred firing with a sequence of L{MessageInfo}, oldest first, that
        nobody modifies afterwards (a session keeps it as it is, no copy).
        """

    def open(index: int) -> "Deferred[IMessageStream]":
        """
        Deferred firing with an L{IMessageStream} for message C{index}, or
        failing with L{MessageGone}.
        """

    def delete(indices: "list[int]") -> "Deferred[list[int]]":
        """
        UPDATE state: remove these messages.  Deferred firing with the list of
        indices that could not be removed (empty when all went).
        """

    def close() -> "Deferred[None]":
        """End of session, whatever its outcome: release locks. Returns a Deferred."""


class IImmediateMailbox(IMailbox):
    """
    An L{IMailbox} whose messages open at once (local files): the server
    opens them with L{open_now}, without a Deferred per RETR or TOP.
    """

    def open_now(index: int) -> IMessageStream:
        """
        An L{IMessageStream} for message C{index}; raises what C{open()}'s
        Deferred would fail with (L{MessageGone}...).
        """


class IMailboxLock(Interface):
    """
    An exclusive per-mailbox session lock.  Today an fcntl lock on a file;
    tomorrow a lease row shared by many front ends.  It must never go stale:
    it dies with its holder.
    """

    def acquire() -> "Deferred[None]":
        """Deferred firing when the lock is held, failing with L{MailboxInUse}."""

    def release() -> "Deferred[None]":
        """Release the lock (idempotent); returns a Deferred."""


class IWatchedMailbox(IMailbox):
    """
    A mailbox whose lock is shared with other hosts (a lease): it needs to
    know how idle its session is (so another host may take an idle session
    over) and how to end the session when the lock is lost.
    """

    def watch(idle_seconds: "Callable[[], float]", lost: "Callable[[str], object]") -> None:
        """
        From now on C{idle_seconds()} tells the session's idleness; C{lost(reason)}
        ends the session without UPDATE.
        """


class IMailStore(Interface):
    """Where mailboxes live: maps an authenticated user to a mailbox."""

    def open_mailbox(user: str, home: "str | None") -> "Deferred[IMailbox]":
        """
        Deferred firing with an L{IMailbox} for C{user} (already locked if the
        store locks), failing with L{MailboxInUse} or L{MailboxUnavailable}.
        C{home} is the user's home directory when the credentials source knows it.
        """


class IMailDelivery(Interface):
    """
    Delivery of new mail into a store (an LMTP service, C{popservice deliver},
    a twisted.mail domain).  Delivery never takes the session lock: a message
    delivered during a POP3 session appears at the user's next login.
    """

    def deliver(user: str, home: "str | None", message: bytes, key: "str | None") -> "Deferred[bool]":
        """
        Store C{message} (as received: any line ends) for C{user}.  Fires
        C{True} when stored, C{False} when a message with the same idempotency
        C{key} (e.g. Message-ID plus digest) was already stored for C{user}:
        an MTA's retry is never stored twice.  Fails with
        L{MailboxUnavailable} when C{user} has no mailbox here (permanent) or
        it cannot be written now (temporary; the exception says which).
        """

    def exists(user: str, home: "str | None") -> "Deferred[bool]":
        """Whether C{user} has (or may have) a mailbox in this store: an LMTP RCPT check."""


class IUserDirectory(Interface):
    """A credentials source that also knows users' home directories."""

    def home(user: str) -> "str | None":
        """The home directory of C{user}, or C{None}."""


class ISessionObserver(Interface):
    """
    The one place every session event passes: connection, login, command,
    retrieval, deletion, logout.  Logs and metrics hook in here.
    """

    def event(name: str, session: object, **fields: object) -> None:
        """Record event C{name} of C{session} with structured C{fields}."""


class IExpiringMailbox(IMailbox):
    """
    A mailbox that remembers when messages were first retrieved, so they can
    be removed a set time later (RFC 2449 EXPIRE).
    """

    def record_retrieved(indices: "list[int]", when: float) -> "Deferred[None]":
        """Note that these messages were retrieved at C{when} (first time only counts)."""

    def expire(days: int, now: float) -> "Deferred[int]":
        """
        Remove the messages first retrieved at least C{days} days before
        C{now}, from the store and from this session's listing (call it before
        L{listing}); fires with how many went.
        """


@dataclass(frozen=True)
class Challenge:
    """Send C{data} to the client as C{+ base64(data)} and wait for its answer."""

    data: bytes


@dataclass(frozen=True)
class Authenticated:
    """The exchange is complete: log in with these credentials."""

    credentials: ICredentials


@dataclass(frozen=True)
class Failed:
    """The exchange failed; C{reason} is a fixed text (never client bytes)."""

    reason: str = "Authentication failed"
    code: str = "AUTH"
    #: the user name the client tried, when the mechanism learnt one (for the log)
    user: str | None = None


#: What one step of a SASL exchange answers.
SASLStep = Union[Challenge, Authenticated, Failed]


class ISASLServerMechanism(Interface):
    """One running server-side SASL exchange (a new object per AUTH command, RFC 5034)."""

    name = Attribute("The IANA mechanism name, upper case, e.g. 'PLAIN'.")
    plaintext = Attribute("True if the secret crosses the wire recoverably (needs TLS or trust).")

    def step(response: "bytes | None") -> "SASLStep | Deferred[SASLStep]":
        """
        Process the client's response (C{None} for no initial response, C{b""}
        for an empty one) and say what comes next.
        """


class ITokenValidator(Interface):
    """Validates OAuth 2.0 bearer tokens presented through SASL (OAUTHBEARER, XOAUTH2)."""

    def validate(token: str, user_hint: "str | None") -> "Deferred[str]":
        """
        Fire with the user name C{token} grants access to, or fail with
        L{popservice.auth.tokens.InvalidToken}.  C{user_hint} is the user the
        client asked for (the OAUTHBEARER authzid, the XOAUTH2 C{user=}), or
        C{None}; when given the validator must refuse a token for another user.
        """
