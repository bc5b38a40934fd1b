"""
What both client engines share and neither needs Twisted for: the errors
(carrying RFC 2449 response codes) and the credentials to log in with.
"""

from __future__ import annotations

import re

from popservice import wire
from popservice.sasl.client import ClientMechanism, SASLCredentials, choose_mechanism, make_mechanism
from popservice.value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "AuthError", "Credentials", "InUseError", "LoginDelayError", "NoMechanismError", "NoUIDLError",
    "POP3ClientError", "POP3Error", "POP3ProtocolError", "SysPermError", "SysTempError", "TLSError",
    "TLSRequiredError", "apop_timestamp", "choose_login", "error_for", "parse_listing",
]


class POP3ClientError(Exception):
    """Base of everything this client raises."""


class POP3Error(POP3ClientError):
    """
    The server answered C{-ERR}.  C{code} is the RFC 2449 response code
    (C{"IN-USE"}, C{"AUTH"}, C{"SYS/TEMP"}...) or C{None}.
    """

    def __init__(self, response: wire.Response, command: str = "") -> None:
        self.response = response
        self.code = response.code
        self.text = response.text
        self.command = command
        super().__init__(
            "{}: -ERR {}{}".format(command or "POP3", f"[{self.code}] " if self.code else "", self.text))

    @property
    def temporary(self) -> bool:
        """RFC 2449/3206: worth retrying later without user action."""
        return self.code in ("IN-USE", "LOGIN-DELAY", "SYS/TEMP")


class InUseError(POP3Error):
    """C{[IN-USE]}: the mailbox is locked by another session."""


class LoginDelayError(POP3Error):
    """C{[LOGIN-DELAY]}: logged in too recently."""


class AuthError(POP3Error):
    """C{[AUTH]}, or a failed login without a code: the credentials are wrong."""


class SysTempError(POP3Error):
    """C{[SYS/TEMP]}: a temporary server-side problem."""


class SysPermError(POP3Error):
    """C{[SYS/PERM]}: a permanent server-side problem."""


_CODE_CLASSES: dict[str, type[POP3Error]] = {
    "IN-USE": InUseError,
    "LOGIN-DELAY": LoginDelayError,
    "AUTH": AuthError,
    "SYS/TEMP": SysTempError,
    "SYS/PERM": SysPermError,
}


def error_for(response: wire.Response, command: str = "", login: bool = False) -> POP3Error:
    """The L{POP3Error} subclass for a C{-ERR} response."""
    cls = _CODE_CLASSES.get(response.code or "")
    if cls is None:
        cls = AuthError if login else POP3Error
    return cls(response, command)


class POP3ProtocolError(POP3ClientError):
    """The server sent something that is not POP3; the connection is dropped."""


class TLSRequiredError(POP3ClientError):
    """TLS was required but the server does not offer STLS."""


class NoMechanismError(POP3ClientError):
    """No login method acceptable to both sides (or plaintext refused without TLS)."""


class TLSError(POP3ClientError):
    """The TLS handshake failed (e.g. the certificate did not verify)."""


class NoUIDLError(POP3ClientError):
    """The server has no UIDL command: a fetch cannot be exactly-once, so none is made."""


class Credentials(Value):
    """
    Who to log in as.  C{token} (OAuth 2.0) selects OAUTHBEARER/XOAUTH2;
    C{mechanisms} restricts the choice (names of SASL mechanisms, C{"APOP"},
    C{"USER"}); C{allow_plaintext} permits sending a password in clear
    over a connection without TLS.
    """

    __slots__ = ("username", "password", "token", "authzid", "mechanisms", "allow_plaintext")

    def __init__(self, username: str, password: str | None = None, token: str | None = None,
                 authzid: str = "", mechanisms: tuple[str, ...] | None = None,
                 allow_plaintext: bool = False) -> None:
        self.username: Final = username
        self.password: Final = password
        self.token: Final = token
        self.authzid: Final = authzid
        self.mechanisms: Final = mechanisms
        self.allow_plaintext: Final = allow_plaintext


# --------------------------------------------------------------------------
# Parsing answers

_LISTING_FAST = re.compile(rb"(?:[0-9]+ [\x21-\x7e]+\r?\n)*")
_LISTING_LINE = re.compile(rb"([0-9]+) ([\x21-\x7e]+)")
_APOP_TIMESTAMP = re.compile(rb"<[^<>\s]*@[^<>\s]*>")


def parse_listing(body: bytes) -> list[tuple[int, str]]:
    """A LIST/UIDL body -> C{(number, token)} pairs."""
    if _LISTING_FAST.fullmatch(body):
        # the usual shape ("<n> <token>" lines): one regex pass instead of a loop
        return [(int(n), u.decode("ascii", "replace")) for n, u in _LISTING_LINE.findall(body)]
    out = []
    for raw in body.split(b"\n"):
        line = raw.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise POP3ProtocolError(f"bad listing line: {line[:80]!r}")
        out.append((int(parts[0]), parts[1].split()[0].decode("ascii", "replace")))
    return out


def apop_timestamp(greeting: bytes) -> bytes | None:
    """RFC 1939 section 7: the APOP timestamp, which may be anywhere in the greeting."""
    m = _APOP_TIMESTAMP.search(greeting)
    return m.group(0) if m else None


def choose_login(credentials: Credentials, sasl: tuple[str, ...], *, user: bool, capa: bool,
                 stls: bool, apop_timestamp: bytes | None,
                 tls: bool) -> tuple[str, ClientMechanism | None]:
    """
    How both client engines log in: the strongest method both sides allow,
    as C{(name, mechanism)}.  A SASL mechanism (SCRAM-SHA-256, CRAM-MD5, then
    PLAIN/LOGIN, or OAUTHBEARER/XOAUTH2 with a token), else C{("APOP", None)},
    else C{("USER", None)} (USER/PASS); plaintext methods need TLS or
    C{credentials.allow_plaintext}.
    C{sasl}: the mechanisms the server's CAPA lists (upper case); C{user},
    C{stls}: whether it lists USER and STLS; C{capa}: whether CAPA answered
    at all (without it USER/PASS is assumed).  Raises L{NoMechanismError}.
    """
    allow_plain = tls or credentials.allow_plaintext
    allowed = None if credentials.mechanisms is None else tuple(
        m.upper() for m in credentials.mechanisms)
    sasl_creds = SASLCredentials(
        credentials.username, credentials.password, credentials.token, credentials.authzid)
    if allowed is not None and len(allowed) == 1 and allowed[0] not in ("APOP", "USER") \
            and allowed[0] not in sasl:
        # an explicit request for a mechanism the server did not list: try it
        mech: ClientMechanism | None = make_mechanism(allowed[0], sasl_creds)
    else:
        mech = choose_mechanism(sasl, sasl_creds, allowed, allow_plain)
    if mech is not None and mech.plaintext and not allow_plain:
        raise NoMechanismError(f"{mech.name} would send the password in clear without TLS")
    if (credentials.password is not None and apop_timestamp is not None
            and (allowed is None or "APOP" in allowed)
            and (mech is None or (mech.plaintext and not tls))):
        return "APOP", None
    if mech is not None:
        return mech.name, mech
    if (credentials.password is not None and (allowed is None or "USER" in allowed)
            and (user or not capa) and allow_plain):
        return "USER", None
    if credentials.password is not None and not allow_plain and stls and not tls:
        raise NoMechanismError("only plaintext login offered: use STLS or allow plaintext")
    raise NoMechanismError(
        "no acceptable login method (server offers SASL {}{}{})".format(
            " ".join(sasl) or "none", ", USER" if user else "", ", APOP" if apop_timestamp else ""))
