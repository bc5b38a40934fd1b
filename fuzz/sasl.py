"""
Fuzz target: the server-side SASL mechanisms (RFC 5034 AUTH) on any client messages.

Input: a mechanism byte, a flags byte (no initial response, TLS with a client
certificate, master users, DIGEST-MD5 host list, the EXTERNAL identity map,
how many messages), a variant byte (which client certificate and in which
form, OAuth discovery URL), then the messages: each but the last preceded by
a length byte, the last taking the rest.

Placeholders let the fuzzer past the checks it cannot solve by mutation:
C{%N} is the server's current nonce (SCRAM's C{r=} from its last challenge,
DIGEST-MD5's C{nonce}), C{%B} the base64 of SCRAM's GS2 header, a final
C{,p=%P} SCRAM's correct client proof for the password C{secret}, and C{%R}
DIGEST-MD5's correct C{response} for it (computed here from the message as
the server will parse it).

Every step must answer L{Challenge}, L{Authenticated} or L{Failed} (or a
Deferred that has already fired with one: the checkers and the token
validator here answer at once) and never raise; once an exchange has
answered L{Authenticated} or L{Failed}, every further step fails; a failure
reason is one line of text.  Nobody gets in without a secret: the token
validator refuses everything; SCRAM and DIGEST-MD5 authenticate only alice
(the one user with secrets) and only with a proof computed here from her
password; PLAIN's master login only with the master's password; EXTERNAL
only over TLS with a certificate that names a user.  PLAIN, LOGIN and
CRAM-MD5 end in credentials the portal checks afterwards.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
from typing import Any

import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from fuzz._harness import Source
from popservice.auth.credentials import ISASLSecretSource, SCRAMSecret
from popservice.auth.tokens import InvalidToken, ITokenValidator
from popservice.sasl.base import Authenticated, Challenge, Failed, MechanismFactory, SASLContext, Verified
from popservice.sasl.digest import digest_response, parse_directives
from popservice.sasl.server import MECHANISMS

#: the mechanisms, in the order the first input byte selects them
NAMES = ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "OAUTHBEARER",
         "XOAUTH2", "EXTERNAL")
_IDENTITY_MAPS = ("cn", "email", "email-localpart", None)
_HASHES = {"SCRAM-SHA-1": hashlib.sha1, "SCRAM-SHA-256": hashlib.sha256}
PASSWORD = b"secret"


@implementer(ISASLSecretSource)
class Secrets:
    """SCRAM keys and a recoverable password for alice (so the non-fake paths run too)."""

    def __init__(self) -> None:
        self._scram: dict[str, SCRAMSecret] = {}
        for name in _HASHES:
            salt, stored, server, iterations = scramp.ScramMechanism(name).make_auth_info("secret", 4096)
            self._scram[name] = (salt, stored, server, iterations)

    def scram_secret(self, user: str, mechanism: str) -> SCRAMSecret | None:
        return self._scram.get(mechanism) if user == "alice" else None

    def sasl_password(self, user: str) -> bytes | None:
        return PASSWORD if user == "alice" else None


@implementer(ITokenValidator)
class RefuseAll:
    def validate(self, token: str, user_hint: str | None) -> "defer.Deferred[str]":
        return defer.fail(InvalidToken("refused by the fuzz harness"))


def _certificate(common_name: str | None, email: str | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = []
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if email is not None:
        attributes.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    name = x509.Name(attributes)
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    if email is not None and common_name is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    return builder.sign(key, hashes.SHA256())


_SECRETS = Secrets()
_PASSWORDS = InMemoryUsernamePasswordDatabaseDontUse(alice=PASSWORD, master=b"masterpw")
_VALIDATOR = RefuseAll()
#: client certificates: alice (CN and e-mail), an e-mail only one, one whose CN is no user name
_CERTIFICATES = (_certificate("alice", "alice@example.org"), _certificate(None, "bob@example.org"),
                 _certificate("../etc", "no-at-sign"))
#: every user name those certificates can map to ("../etc" is refused)
_CERTIFICATE_USERS = frozenset({"alice", "bob", "alice@example.org", "bob@example.org", "no-at-sign"})
_SALTED: dict[tuple[str, bytes, int], bytes] = {}


def _certificate_form(variant: int) -> object:
    """One of the certificates, as cryptography, DER bytes or pyOpenSSL has it."""
    cert = _CERTIFICATES[variant % 3]
    form = (variant >> 2) % 3
    if form == 1:
        return cert.public_bytes(Encoding.DER)
    if form == 2:
        return crypto.X509.from_cryptography(cert)
    return cert


def context(flags: int, variant: int) -> SASLContext:
    services: dict[str, Any] = {"token_validator": _VALIDATOR, "oauth_scope": "mail"}
    if flags & 4:
        services["master_users"] = ["master"]
    if flags & 8:
        services["digest_uri_hosts"] = ["mail.example.org"]
    identity = _IDENTITY_MAPS[(flags >> 4) & 3]
    if identity is not None:
        services["external_identity"] = identity
    if variant & 0x80:
        services["oauth_configuration"] = "https://auth.example.org/.well-known/openid-configuration"
    tls = bool(flags & 2)
    return SASLContext(hostname="mail.example.org", tls=tls, peer="192.0.2.1",
                       peer_certificate=_certificate_form(variant) if tls else None,
                       checkers=(_SECRETS, _PASSWORDS), services=services)


def settle(result: object) -> object:
    """The value of an already-fired Deferred (a pending one is a failure of this target)."""
    if not isinstance(result, defer.Deferred):
        return result
    box: list[object] = []
    result.addBoth(box.append)
    assert box, "a step's Deferred has not fired"
    value = box[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value


def _attributes(message: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for part in message.split(b","):
        key, sep, value = part.partition(b"=")
        if sep and len(key) == 1:
            out.setdefault(key, value)
    return out


def scram_proof(name: str, client_first: bytes, server_first: bytes, without_proof: bytes) -> bytes:
    """RFC 5802 section 3: the client proof for PASSWORD (base64), as a real client computes it."""
    attributes = _attributes(server_first)
    try:
        salt = base64.b64decode(attributes.get(b"s", b""), validate=True)
        iterations = int(attributes.get(b"i", b"0"))
    except ValueError:
        return b""
    if not 0 < iterations <= 10000:
        return b""
    digest = _HASHES[name]
    key = (name, salt, iterations)
    if key not in _SALTED:
        if len(_SALTED) > 64:
            _SALTED.clear()
        _SALTED[key] = hashlib.pbkdf2_hmac(digest().name, PASSWORD, salt, iterations)
    client_key = hmac.new(_SALTED[key], b"Client Key", digest).digest()
    bare = client_first.split(b",", 2)[2] if client_first.count(b",") >= 2 else b""
    auth_message = b",".join((bare, server_first, without_proof))
    signature = hmac.new(digest(client_key).digest(), auth_message, digest).digest()
    return base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))


def digest_md5_response(message: bytes) -> bytes:
    """RFC 2831: the correct C{response} for PASSWORD over the directives of C{message} (%R blank)."""
    try:
        d = parse_directives(message.replace(b"%R", b"0"))
        charset = "utf-8" if d.get("charset") == b"utf-8" else "iso-8859-1"
        username, realm = d["username"].decode(charset), d.get("realm", b"").decode(charset)
        return digest_response(username, realm, PASSWORD.decode(), d["nonce"], d["cnonce"], d["nc"],
                               d.get("qop", b"auth"), d["digest-uri"], d.get("authzid", b""))
    except (ValueError, KeyError):
        return b""


def run(name: str, factory: MechanismFactory, flags: int, variant: int, messages: list[bytes | None]) -> None:
    mechanism = factory(context(flags, variant))
    finished = False
    forged = False
    last = b""
    first = next((m for m in messages if m is not None), b"")
    gs2 = b",".join(first.split(b",", 2)[:2]) + b","
    for message in messages:
        if message is not None:
            nonce = (bytes(getattr(mechanism, "nonce", b"")) if name == "DIGEST-MD5"
                     else _attributes(last).get(b"r", b""))
            message = message.replace(b"%N", nonce).replace(b"%B", base64.b64encode(gs2))
            if name.startswith("SCRAM") and message.endswith(b",p=%P") and last:
                message = message[:-2] + scram_proof(name, first, last, message[:-5])
                forged = True
            if name == "DIGEST-MD5" and b"%R" in message:
                message = message.replace(b"%R", digest_md5_response(message))
                forged = True
        result = settle(mechanism.step(message))
        assert isinstance(result, (Challenge, Authenticated, Failed)), (name, result)
        if finished:
            assert isinstance(result, Failed), (name, "a finished exchange went on", result)
        if isinstance(result, Challenge):
            assert isinstance(result.data, bytes)
            last = result.data
        elif isinstance(result, Failed):
            assert isinstance(result.reason, str) and result.reason, result
            assert "\r" not in result.reason and "\n" not in result.reason, result
            finished = True
        else:
            check_authenticated(name, result, flags, forged, message or b"")
            finished = True


def check_authenticated(name: str, result: Authenticated, flags: int, forged: bool, message: bytes) -> None:
    """Who may be let in, and how."""
    credentials = result.credentials
    if name in ("SCRAM-SHA-1", "SCRAM-SHA-256", "DIGEST-MD5"):
        assert forged and isinstance(credentials, Verified), (name, result)
        assert credentials.username == "alice", (name, result)
    elif name == "PLAIN" and isinstance(credentials, Verified):
        authzid, master, password = message.split(b"\x00")
        assert flags & 4 and master == b"master" and password == b"masterpw", (name, result)
        assert credentials.username == authzid.decode(), (name, result)
    elif name == "EXTERNAL":
        assert flags & 2 and isinstance(credentials, Verified), (name, result)
        assert credentials.username in _CERTIFICATE_USERS, result
    else:
        assert name in ("PLAIN", "LOGIN", "CRAM-MD5"), (name, "authenticated", result)
        assert not isinstance(credentials, Verified), (name, result)


def TestOneInput(data: bytes) -> None:
    src = Source(data)
    name = NAMES[src.byte() % len(NAMES)]
    flags = src.byte()
    variant = src.byte()
    count = 1 + (flags >> 6)
    messages: list[bytes | None] = [None] if flags & 1 else []
    for _ in range(count - 1):
        messages.append(src.take(src.byte()))
    messages.append(src.rest())
    run(name, MECHANISMS[name], flags, variant, messages)
