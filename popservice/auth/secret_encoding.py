"""
How Dovecot encodes the secret of a stored password: C{HEX} (base16, RFC 4648
section 8) or C{B64} (base64, RFC 4648 section 4, padding optional), chosen
by a C{{SCHEME.HEX}} / C{{SCHEME.B64}} (or C{.BASE64}) suffix or else by the
scheme's default; plus the UTF-8 rule for passwords given as C{str}.

Shared by L{popservice.auth.schemes}, L{popservice.auth.scram} and the
checker in L{popservice.auth.passwdfile}.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

__all__ = ["ENCODINGS", "b64decode", "decode_digest", "decode_plain", "to_bytes"]

#: Encoding suffixes of a C{{SCHEME.SUFFIX}} prefix and what they mean.
ENCODINGS = {"HEX": "HEX", "B64": "B64", "BASE64": "B64"}


def to_bytes(value: bytes | str) -> bytes:
    """C{value} as bytes, a C{str} encoded as UTF-8."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def b64decode(text: str) -> bytes:
    """Strict base64 decoding that accepts missing padding."""
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def decode_digest(text: str, encoding: str | None, default: str, ok: Callable[[int], bool]) -> bytes | None:
    """
    Decode a digest field as Dovecot does: with the explicit encoding if any,
    else the scheme's default one, falling back to the other one when the
    length does not fit (Dovecot accepts both).
    """
    if encoding is not None:
        order = [encoding]
    else:
        order = [default, "B64" if default == "HEX" else "HEX"]
    for enc in order:
        try:
            raw = bytes.fromhex(text) if enc == "HEX" else b64decode(text)
        except (ValueError, binascii.Error):
            continue
        if ok(len(raw)):
            return raw
    return None


def decode_plain(text: str, encoding: str | None) -> bytes | None:
    """A PLAIN secret: UTF-8 without a suffix, else HEX or B64; C{None} if malformed."""
    if encoding is None:
        return text.encode("utf-8")
    try:
        return bytes.fromhex(text) if encoding == "HEX" else b64decode(text)
    except (ValueError, binascii.Error):
        return None
