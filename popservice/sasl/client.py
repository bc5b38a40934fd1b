"""
Client side of the SASL mechanisms a POP3 client meets (RFC 5034 AUTH).

Each mechanism is a small state machine: L{ClientMechanism.initial} gives the
initial response (or C{None} when the mechanism starts with a server
challenge), L{ClientMechanism.respond} answers each decoded challenge.  The
protocol does the base64 and the C{+ }/C{*} framing; nothing here does I/O.

L{choose_mechanism} picks the strongest mechanism both sides support.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from popservice.value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final


class SASLError(Exception):
    """The server's challenge or final message is unacceptable."""


class SASLCredentials(Value):
    """
    What a mechanism may need; C{token} is an OAuth 2.0 bearer token;
    C{host} and C{port} are for OAUTHBEARER's gs2/kvpairs (RFC 7628 section 3.1).
    """

    __slots__ = ("username", "password", "token", "authzid", "host", "port")

    def __init__(self, username: str, password: str | None = None, token: str | None = None,
                 authzid: str = "", host: str = "", port: int = 0) -> None:
        self.username: Final = username
        self.password: Final = password
        self.token: Final = token
        self.authzid: Final = authzid
        self.host: Final = host
        self.port: Final = port


class ClientMechanism:
    """Base class: one exchange, one instance."""

    name = ""
    #: True when the password crosses the wire in a recoverable form.
    plaintext = False

    def __init__(self, creds: SASLCredentials) -> None:
        self.creds = creds

    def initial(self) -> bytes | None:
        """The initial response (RFC 4422 section 5), C{None} to wait for a challenge."""
        return None

    def respond(self, challenge: bytes) -> bytes:
        """Answer one challenge; raise L{SASLError} to abort the exchange."""
        raise SASLError(f"{self.name}: unexpected challenge")

    def _password(self) -> str:
        if self.creds.password is None:
            raise SASLError(f"{self.name} needs a password")
        return self.creds.password


class Plain(ClientMechanism):
    """RFC 4616: authzid NUL authcid NUL password, as the initial response."""

    name = "PLAIN"
    plaintext = True

    def initial(self) -> bytes | None:
        c = self.creds
        return b"\0".join(
            s.encode("utf-8") for s in (c.authzid, c.username, self._password()))

    def respond(self, challenge: bytes) -> bytes:
        # a server that ignored the initial response sends an empty challenge
        if challenge:
            raise SASLError("PLAIN: unexpected non-empty challenge")
        initial = self.initial()
        assert initial is not None
        return initial


class Login(ClientMechanism):
    """draft-murchison-sasl-login: user name, then password, on two challenges."""

    name = "LOGIN"
    plaintext = True

    def __init__(self, creds: SASLCredentials) -> None:
        super().__init__(creds)
        self._step = 0

    def respond(self, challenge: bytes) -> bytes:
        self._step += 1
        if self._step == 1:
            return self.creds.username.encode("utf-8")
        if self._step == 2:
            return self._password().encode("utf-8")
        raise SASLError("LOGIN: too many challenges")


class CramMD5(ClientMechanism):
    """RFC 2195: user name, space, hex HMAC-MD5 of the challenge keyed by the password."""

    name = "CRAM-MD5"

    def respond(self, challenge: bytes) -> bytes:
        if not challenge:
            raise SASLError("CRAM-MD5: empty challenge")
        import hashlib  # here, not at the top: a plain fetch should not pay for OpenSSL's start-up
        import hmac

        digest = hmac.new(self._password().encode("utf-8"), challenge, hashlib.md5).hexdigest()
        return self.creds.username.encode("utf-8") + b" " + digest.encode("ascii")


def _scram_name(text: str) -> str:
    """RFC 5802 section 5.1: C{=} and C{,} in a name are escaped."""
    return text.replace("=", "=3D").replace(",", "=2C")


class ScramSHA256(ClientMechanism):
    """
    RFC 7677 SCRAM-SHA-256 (RFC 5802, no channel binding); verifies the
    server's signature.  Written on hashlib/hmac (no import of a SCRAM
    library on the way to a login); a user name or password outside
    printable ASCII goes through SASLprep (RFC 4013) from scramp.
    """

    name = "SCRAM-SHA-256"
    #: refuse absurd iteration counts from a hostile server (a CPU burn)
    MAX_ITERATIONS = 10_000_000

    def __init__(self, creds: SASLCredentials) -> None:
        super().__init__(creds)
        password, user = self._password(), creds.username
        if not (password.isascii() and password.isprintable() and user.isascii()
                and user.isprintable()):
            from scramp.utils import saslprep

            password, user = saslprep(password), saslprep(user)
        self._password_bytes = password.encode("utf-8")
        import secrets  # as in CramMD5.respond

        self._nonce = base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._first_bare = f"n={_scram_name(user)},r={self._nonce}"
        self._server_signature = b""
        self._step = 0
        #: True once the server proved it knows the password (server-final verified)
        self.server_verified = False

    def initial(self) -> bytes | None:
        self._step = 1
        return ("n,," + self._first_bare).encode("utf-8")

    def _final(self, server_first: str) -> bytes:
        fields = dict(f.split("=", 1) for f in server_first.split(",") if "=" in f)
        if server_first.startswith("m="):
            raise SASLError("SCRAM-SHA-256: unsupported mandatory extension")
        nonce, salt_b64, iterations = fields.get("r", ""), fields.get("s"), fields.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise SASLError("SCRAM-SHA-256: the server's nonce does not extend ours")
        if salt_b64 is None or not iterations.isdigit():
            raise SASLError("SCRAM-SHA-256: malformed server-first-message")
        count = int(iterations)
        if not 1 <= count <= self.MAX_ITERATIONS:
            raise SASLError(f"SCRAM-SHA-256: unacceptable iteration count {count}")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except ValueError:
            raise SASLError("SCRAM-SHA-256: salt is not base64")
        import hashlib
        import hmac

        salted = hashlib.pbkdf2_hmac("sha256", self._password_bytes, salt, count)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth = f"{self._first_bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}".encode()

    def _verify(self, server_final: str) -> None:
        if server_final.startswith("e="):
            raise SASLError(f"SCRAM-SHA-256: server error {server_final[2:]}")
        value = server_final.split(",", 1)[0]
        if not value.startswith("v="):
            raise SASLError("SCRAM-SHA-256: malformed server-final-message")
        try:
            got = base64.b64decode(value[2:], validate=True)
        except ValueError:
            raise SASLError("SCRAM-SHA-256: server signature is not base64")
        import hmac

        if not hmac.compare_digest(got, self._server_signature):
            raise SASLError("SCRAM-SHA-256: the server's signature is wrong")

    def respond(self, challenge: bytes) -> bytes:
        try:
            text = challenge.decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError("SCRAM-SHA-256: challenge is not UTF-8")
        if self._step == 1:
            self._step = 2
            return self._final(text)
        if self._step == 2:
            self._step = 3
            self._verify(text)
            self.server_verified = True
            return b""
        raise SASLError("SCRAM-SHA-256: too many challenges")


class XOAuth2(ClientMechanism):
    """Google/Microsoft XOAUTH2: C{user=U^Aauth=Bearer T^A^A}; an error JSON is acknowledged."""

    name = "XOAUTH2"

    def _token(self) -> str:
        if self.creds.token is None:
            raise SASLError(f"{self.name} needs an OAuth token")
        if not self.creds.token.strip():
            raise SASLError(f"{self.name}: the OAuth token is empty")
        return self.creds.token

    def initial(self) -> bytes | None:
        return (f"user={self.creds.username}\x01auth=Bearer {self._token()}\x01\x01").encode()

    def respond(self, challenge: bytes) -> bytes:
        # the server sends a JSON error as a challenge; an empty answer ends it (-ERR follows)
        return b""


class OAuthBearer(XOAuth2):
    """RFC 7628 OAUTHBEARER; an error JSON challenge is answered with C{^A} (section 3.2.3)."""

    name = "OAUTHBEARER"

    def initial(self) -> bytes | None:
        c = self.creds
        gs2 = "n,a={},".format(c.username.replace("=", "=3D").replace(",", "=2C"))
        kv = ""
        if c.host:
            kv += f"host={c.host}\x01"
        if c.port:
            kv += f"port={c.port}\x01"
        return (f"{gs2}\x01{kv}auth=Bearer {self._token()}\x01\x01").encode()

    def respond(self, challenge: bytes) -> bytes:
        return b"\x01"


MECHANISMS: dict[str, type[ClientMechanism]] = {
    m.name: m for m in (ScramSHA256, CramMD5, Plain, Login, OAuthBearer, XOAuth2)
}

#: Strongest first.  Challenge-response before plaintext: SCRAM proves the
#: server too, CRAM-MD5 at least keeps the password off the wire.
PASSWORD_PREFERENCE = ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")
TOKEN_PREFERENCE = ("OAUTHBEARER", "XOAUTH2")


def choose_mechanism(
    offered: Sequence[str],
    creds: SASLCredentials,
    allowed: Sequence[str] | None = None,
    allow_plaintext: bool = True,
) -> ClientMechanism | None:
    """
    The strongest mechanism in C{offered} (the server's CAPA SASL list) usable
    with C{creds}; C{allowed} restricts the choice (e.g. from a URL's
    C{;AUTH=}); plaintext mechanisms are skipped unless C{allow_plaintext}.
    """
    offered_up = {m.upper() for m in offered}
    prefs: list[str] = []
    if creds.token is not None:
        prefs += TOKEN_PREFERENCE
    if creds.password is not None:
        prefs += PASSWORD_PREFERENCE
    for name in prefs:
        if name not in offered_up:
            continue
        if allowed is not None and name not in {a.upper() for a in allowed}:
            continue
        cls = MECHANISMS[name]
        if cls.plaintext and not allow_plaintext:
            continue
        return cls(creds)
    return None


def make_mechanism(name: str, creds: SASLCredentials) -> ClientMechanism:
    """An instance of the named mechanism; L{SASLError} when unknown here."""
    cls = MECHANISMS.get(name.upper())
    if cls is None:
        raise SASLError(f"unsupported SASL mechanism {name!r}")
    return cls(creds)
