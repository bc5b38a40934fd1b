"""
What both client engines share and neither needs Twisted for: the errors
(carrying RFC 2449 response codes) and the credentials to log in with.
"""

from __future__ import annotations

import re

from popservice import wire
from popservice.sasl.client import MECHANISMS, ClientMechanism, SASLCredentials, choose_mechanism
from popservice.value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "AuthError", "Credentials", "InUseError", "LoginDelayError", "NoMechanismError", "NoUIDLError",
    "POP3ClientError", "POP3Error", "POP3ProtocolError", "PlaintextRefusedError", "SysPermError",
    "SysTempError", "TLSError", "TLSRequiredError", "apop_timestamp", "certificate_error",
    "choose_login", "error_for", "handshake_error", "name_mismatch", "parse_listing",
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


class PlaintextRefusedError(NoMechanismError):
    """Only methods that send the password in clear are left, and the connection has no TLS."""


# --------------------------------------------------------------------------
# Certificate errors: one text for each problem, whichever engine (and
# whichever OpenSSL build: the ssl module's and pyOpenSSL's differ) met it.

#: OpenSSL's X509_V_ERR_* codes of the usual verification failures
_CERT_PROBLEMS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsuitable certificate purpose",
}
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64


def name_mismatch(host: str, ip: bool) -> str:
    """The certificate does not name C{host} (RFC 6125: its subjectAltNames; the CN is not used)."""
    if ip:
        return f"IP address mismatch, certificate is not valid for '{host}'."
    return f"Hostname mismatch, certificate is not valid for '{host}'."


def certificate_error(host: str, code: int, library_text: str, ip: bool = False) -> TLSError:
    """
    A failed certificate check as a L{TLSError}: C{code} is OpenSSL's
    X509_V_ERR_* code, C{library_text} the library's text for it (used
    only for codes outside the usual ones).
    """
    if code in (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH):
        reason = name_mismatch(host, code == X509_V_ERR_IP_ADDRESS_MISMATCH)
    else:
        reason = _CERT_PROBLEMS.get(code) or library_text or f"verify error {code}"
    return TLSError(f"certificate verification failed for {host}: {reason}")


def handshake_error(host: str, reason: str) -> TLSError:
    """Any other failed TLS handshake (C{reason}: OpenSSL's, e.g. C{"wrong version number"})."""
    return TLSError(f"handshake with {host} failed: {reason}")


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


def _offered(sasl: tuple[str, ...], user: bool, capa: bool, apop_timestamp: bytes | None) -> list[str]:
    """Every login method the server offers, by name (SASL mechanisms, APOP, USER)."""
    out = list(sasl)
    if apop_timestamp is not None:
        out.append("APOP")
    if user or not capa:  # (without CAPA, RFC 1939's USER/PASS is assumed)
        out.append("USER")
    return out


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
    at all (without it USER/PASS is assumed).

    Nothing is tried that the server does not offer, and nothing is sent
    that would be refused locally anyway: L{NoMechanismError} (decided
    before any credential is sent) for a method asked for (C{mechanisms})
    that the server does not list, for an empty OAuth token, and, as
    L{PlaintextRefusedError}, when only methods that send the password in
    clear are left on a connection without TLS.
    """
    allow_plain = tls or credentials.allow_plaintext
    allowed = None if credentials.mechanisms is None else tuple(
        m.upper() for m in credentials.mechanisms)
    offered = _offered(sasl, user, capa, apop_timestamp)
    unknown = [m for m in allowed or () if m not in MECHANISMS and m not in ("APOP", "USER")]
    if unknown:
        raise NoMechanismError("unknown login method {} (this client knows {} APOP USER)".format(
            " ".join(unknown), " ".join(MECHANISMS)))
    if credentials.token is not None and not credentials.token.strip():
        raise NoMechanismError("the OAuth token is empty: not sending an empty bearer token")
    if allowed is not None and not any(m in offered for m in allowed):
        raise NoMechanismError("the server does not offer {} (it offers {})".format(
            " or ".join(allowed), " ".join(offered) or "no login method"))
    sasl_creds = SASLCredentials(
        credentials.username, credentials.password, credentials.token, credentials.authzid)
    mech = choose_mechanism(sasl, sasl_creds, allowed, allow_plain)
    if (credentials.password is not None and apop_timestamp is not None
            and (allowed is None or "APOP" in allowed)
            and (mech is None or (mech.plaintext and not tls))):
        return "APOP", None
    if mech is not None:
        return mech.name, mech
    if (credentials.password is not None and (allowed is None or "USER" in allowed)
            and "USER" in offered and allow_plain):
        return "USER", None
    if credentials.password is not None and not allow_plain:
        in_clear = [m for m in offered if m in ("USER", "PLAIN", "LOGIN")
                    and (allowed is None or m in allowed)]
        if in_clear:
            raise PlaintextRefusedError(
                "refusing to send the password in clear ({}) over a connection without TLS: "
                "use pop3s://{} or allow plaintext (--allow-plaintext)".format(
                    " ".join(in_clear), " or STLS" if stls else ""))
    if credentials.password is None and credentials.token is None:
        raise NoMechanismError("no password and no OAuth token to log in with")
    what = "a password" if credentials.password is not None else "an OAuth token"
    restricted = f" (restricted to {' '.join(allowed)})" if allowed is not None else ""
    raise NoMechanismError(
        f"no acceptable login method: the server offers {' '.join(offered) or 'none'}; "
        f"none of them{restricted} works with {what}")
