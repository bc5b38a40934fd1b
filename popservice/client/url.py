"""
POP3 URLs (RFC 2384, C{pop3s} for implicit TLS per RFC 8314), without
Twisted: shared by both client engines (the blocking fetch engine must start
without importing Twisted).
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

__all__ = ["DEFAULT_PORTS", "POP3URL", "parse_url"]

DEFAULT_PORTS = {"pop3": 110, "pop3s": 995}


class POP3URL(NamedTuple):
    """A parsed RFC 2384 URL (C{pop3s} for implicit TLS, RFC 8314)."""

    scheme: str
    host: str
    port: int
    user: str | None = None
    #: C{;AUTH=} value: None/"*" any, "+APOP", or a SASL mechanism name
    auth: str | None = None

    @property
    def implicit_tls(self) -> bool:
        return self.scheme == "pop3s"

    @property
    def mechanisms(self) -> tuple[str, ...] | None:
        """The login methods the URL allows (None: any)."""
        if self.auth is None or self.auth == "*":
            return None
        if self.auth.upper() == "+APOP":
            return ("APOP",)
        return (self.auth.upper(),)

    def __str__(self) -> str:
        user = ""
        if self.user is not None:
            user = self.user + (f";AUTH={self.auth}" if self.auth else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"


def parse_url(url: str) -> POP3URL:
    """Parse C{pop3://[user[;AUTH=mech]@]host[:port]} or its C{pop3s} form."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"not a pop3:// or pop3s:// URL: {url!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"a POP3 URL has no path: {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"bad port in {url!r}")
    user: str | None = None
    auth: str | None = None
    if parts.username is not None:
        raw = parts.username
        m = re.match(r"(.*?);auth=(.*)\Z", raw, re.IGNORECASE)
        if m:
            raw, auth = m.group(1), unquote(m.group(2))
        user = unquote(raw) or None
    return POP3URL(scheme, host, port, user, auth)
