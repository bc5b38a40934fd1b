"""
What the delivery doors share: which mailbox user an address names, and
what kind of failure a store reported (the LMTP reply code, the exit code of
C{popservice deliver}, the SMTP reply of the twisted.mail domain follow it).
"""

from __future__ import annotations

import enum
import errno

from popservice.interfaces import MailboxUnavailable, NoSuchMailbox

__all__ = ["Trouble", "classify", "local_part_user"]

#: errnos that mean "no space" rather than "broken"
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def local_part_user(local: bytes, domain: bytes) -> str | None:
    """The default mailbox user of C{local@domain}: the local part (ASCII), whatever the domain."""
    try:
        return local.decode("ascii") or None
    except UnicodeDecodeError:
        return None


class Trouble(enum.Enum):
    """A store's failure, as a sender must treat it."""

    #: the user has no mailbox here: permanent (LMTP 550, EX_NOUSER)
    NO_MAILBOX = "no such mailbox"
    #: out of space or over quota: temporary (LMTP 452, EX_TEMPFAIL)
    NO_SPACE = "insufficient storage"
    #: anything else the store reported: temporary (LMTP 451, EX_TEMPFAIL)
    UNAVAILABLE = "mailbox temporarily unavailable"
    #: not a store failure at all (a bug): temporary, and logged
    UNEXPECTED = "local error in processing"


def classify(error: BaseException | None) -> Trouble:
    """What kind of failure C{error} (from L{IMailDelivery}) is."""
    if isinstance(error, NoSuchMailbox):
        return Trouble.NO_MAILBOX
    if isinstance(error, MailboxUnavailable):
        cause = error.__cause__
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return Trouble.NO_SPACE
        return Trouble.UNAVAILABLE
    return Trouble.UNEXPECTED
