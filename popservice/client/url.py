"""
POP3 URLs (RFC 2384, C{pop3s} for implicit TLS per RFC 8314), without
Twisted: shared by both client engines (the blocking fetch engine must start
without importing Twisted).
"""

from __future__ import annotations

import re

from popservice.value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["DEFAULT_PORTS", "POP3URL", "parse_url"]

DEFAULT_PORTS = {"pop3": 110, "pop3s": 995}


class POP3URL(Value):
    """A parsed RFC 2384 URL (C{pop3s} for implicit TLS, RFC 8314)."""

    __slots__ = ("scheme", "host", "port", "user", "auth")

    def __init__(self, scheme: str, host: str, port: int, user: str | None = None,
                 auth: str | None = None) -> None:
        self.scheme: Final = scheme
        self.host: Final = host
        self.port: Final = port
        self.user: Final = user
        #: C{;AUTH=} value: None/"*" any, "+APOP", or a SASL mechanism name
        self.auth: Final = auth

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


# RFC 2384 section 3 (RFC 3986 for the authority): scheme "://" [userinfo "@"]
# host [":" port] and at most a "/" after it.  Parsed here rather than with
# urllib.parse, which costs the fetch client's start-up ~4 ms (it imports
# ipaddress) for what these few lines do.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(?:([^/?#@]*)@)?(\[[^\]/?#@]*\]|[^:/?#@\[\]]*)"
                  r"(?::([0-9]*))?(/?)\Z")
_AUTH = re.compile(r"(.*?);auth=(.*)\Z", re.IGNORECASE | re.DOTALL)
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def _unquote(text: str) -> str:
    """Percent-decoding as C{urllib.parse.unquote} does it (UTF-8, errors replaced)."""
    if "%" not in text:
        return text
    raw = _PERCENT.sub(lambda m: bytes.fromhex(m.group(1).decode("ascii")), text.encode("utf-8"))
    return raw.decode("utf-8", "replace")


def parse_url(url: str) -> POP3URL:
    """Parse C{pop3://[user[;AUTH=mech]@]host[:port]} or its C{pop3s} form."""
    m = None if _UNSAFE.search(url) else _URL.match(url)  # spaces and controls must be %-encoded
    if m is None:
        scheme = url.partition("://")[0].lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"not a pop3:// or pop3s:// URL: {url!r}")
        if re.match(r"[^/?#]*://[^/?#]*[/?#].", url):
            raise ValueError(f"a POP3 URL has no path, query or fragment: {url!r}")
        raise ValueError(f"bad POP3 URL: {url!r}")
    scheme_raw, userinfo, host, port_text, _slash = m.groups()
    scheme = scheme_raw.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"not a pop3:// or pop3s:// URL: {url!r}")
    if host.startswith("["):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"bad IPv6 address in {url!r}")
    host = host.lower()
    if not host:
        raise ValueError(f"no host in {url!r}")
    port = int(port_text) if port_text else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {url!r}")
    user: str | None = None
    auth: str | None = None
    if userinfo is not None:
        raw = userinfo.partition(":")[0]  # a password in the URL is ignored, never used
        am = _AUTH.match(raw)
        if am:
            raw, auth = am.group(1), _unquote(am.group(2))
        user = _unquote(raw) or None
    return POP3URL(scheme, host, port, user, auth)
