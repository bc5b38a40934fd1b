"""
The idempotency key of a delivery: C{<message-id> sha256:HEX}, or just
C{sha256:HEX} when the message has no Message-ID.  The digest is taken over
the message with LF line ends, so the same message has the same key whether
it came over LMTP (CRLF) or through a pipe (LF).

A store records the key per mailbox (L{popservice.interfaces.IMailDelivery}):
an MTA that retries a message after a lost reply gets it stored once.  Two
different messages never share a key (the digest covers every byte); the
Message-ID is there for the people reading a record, not for uniqueness.
"""

from __future__ import annotations

import hashlib
import re

from popservice.wire import crlf_to_lf

__all__ = ["delivery_key", "message_id"]

_MESSAGE_ID = re.compile(rb"(?im)^message-id[ \t]*:[ \t]*(.*(?:\n[ \t].*)*)")
_HEADER_END = re.compile(rb"\n\n")
#: at most this much of a Message-ID goes into a key
MAX_ID_LENGTH = 250


def message_id(message: bytes) -> str | None:
    """The Message-ID of C{message} (unfolded, printable ASCII, angle brackets kept), or C{None}."""
    text = crlf_to_lf(message)
    end = _HEADER_END.search(text)
    header = text[:end.start() + 1] if end is not None else text
    if text.startswith(b"\n"):
        return None  # no header at all
    m = _MESSAGE_ID.search(header)
    if m is None:
        return None
    value = b"".join(m.group(1).split())
    value = bytes(c for c in value if 0x21 <= c <= 0x7E)[:MAX_ID_LENGTH]
    return value.decode("ascii") or None


def delivery_key(message: bytes) -> str:
    """The idempotency key of C{message} (see the module docstring)."""
    digest = "sha256:" + hashlib.sha256(crlf_to_lf(message)).hexdigest()
    mid = message_id(message)
    return digest if mid is None else "%s %s" % (mid, digest)
