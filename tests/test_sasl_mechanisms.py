"""
Unit tests of the server-side SASL mechanisms (popservice.sasl.*), the token
validators (popservice.auth.tokens) and the SCRAM/secret support of the
passwd-file checker: each mechanism's step logic, without sockets.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import re
from typing import Any

import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.trial import unittest

from popservice.auth.credentials import CramMD5Credentials, MasterUserCredentials
from popservice.auth.passwdfile import (
    PasswdFileChecker,
    hash_password,
    scram_extra_fields,
    scram_keys,
)
from popservice.auth.tokens import (
    JWK,
    InvalidToken,
    ITokenValidator,
    JWTValidator,
    StaticTokenValidator,
    b64url_encode,
    load_keys,
    make_jwt,
)
from popservice.sasl.base import Authenticated, Challenge, Failed, ISASLServerMechanism, SASLContext, Verified
from popservice.sasl.cram import CramMD5Mechanism
from popservice.sasl.digest import DigestMD5Mechanism, parse_directives
from popservice.sasl.external import ExternalMechanism, certificate_identity
from popservice.sasl.oauth import OAuthBearerMechanism, XOAuth2Mechanism, parse_oauthbearer, parse_xoauth2
from popservice.sasl.plain import LoginMechanism, MasterUserChecker, PlainMechanism
from popservice.sasl.scram import ScramSHA1Mechanism, ScramSHA256Mechanism
from popservice.sasl.server import (
    DEFAULT_MECHANISMS,
    MECHANISMS,
    mechanisms_for_checker,
    mechanisms_from_option,
    missing_services,
)

HOST = "pop.example"


def sync_thread(f: Any) -> "defer.Deferred[Any]":
    return defer.succeed(f())


def write_passwd(path: str) -> None:
    """Users with every kind of secret the mechanisms care about."""
    lines = [
        "alice:{PLAIN}secret:::::",
        "bob:%s::::::%s" % (hash_password("bobpw", "SSHA512"), scram_extra_fields("bobpw")),
        "carol:%s:::::" % (hash_password("carolpw", "SCRAM-SHA-256"),),
        "dave:%s:::::" % (hash_password("davepw", "CRAM-MD5"),),
        "eve:{PLAIN}evepw::::::nologin",
        "master:{PLAIN}masterpw:::::",
        "frank:%s:::::" % (hash_password("frankpw", "SSHA512"),),
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class MechanismTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        write_passwd(self.path)
        self.checker = PasswdFileChecker(self.path, run_in_thread=sync_thread)

    def context(self, **kw: Any) -> SASLContext:
        kw.setdefault("hostname", HOST)
        kw.setdefault("tls", True)
        kw.setdefault("checkers", (self.checker,))
        return SASLContext(**kw)

    def step(self, mechanism: Any, response: bytes | None) -> Any:
        return self.successResultOf(defer.maybeDeferred(mechanism.step, response))

    def login(self, credentials: Any) -> Any:
        """What the portal's passwd-file checker says about credentials."""
        d = self.checker.requestAvatarId(credentials)
        return self.successResultOf(d.addErrback(lambda f: f.trap(UnauthorizedLogin) and None))

    def assertFailed(self, result: object) -> None:
        self.assertIsInstance(result, Failed)


class ClientFirst(MechanismTestCase):
    def test_missing_initial_response_asked_once(self) -> None:
        """RFC 4422 section 5: no initial response -> one empty challenge; a second miss fails."""
        for cls in (PlainMechanism, ExternalMechanism, ScramSHA256Mechanism, OAuthBearerMechanism,
                    XOAuth2Mechanism):
            mechanism = cls(self.context())
            self.assertEqual(self.step(mechanism, None), Challenge(b""), cls.name)
            self.assertFailed(self.step(mechanism, None))
            self.assertFailed(self.step(mechanism, b"anything"))  # and it stays finished


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


class Registry(unittest.TestCase):
    def test_every_factory_makes_a_mechanism(self) -> None:
        for name, factory in MECHANISMS.items():
            mechanism = factory(SASLContext(hostname=HOST, tls=True))
            self.assertTrue(ISASLServerMechanism.providedBy(mechanism), name)
            self.assertEqual(mechanism.name, name)

    def test_plaintext_flags(self) -> None:
        flagged = {name for name, f in MECHANISMS.items() if getattr(f, "plaintext", False)}
        # passwords and bearer tokens cross the wire recoverably: TLS or trusted peers only
        self.assertEqual(flagged, {"PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"})

    def test_option_parsing(self) -> None:
        parsed = mechanisms_from_option("scram-sha-256, PLAIN  LOGIN")
        self.assertEqual(list(parsed), ["SCRAM-SHA-256", "PLAIN", "LOGIN"])
        self.assertIs(parsed["PLAIN"], PlainMechanism)
        self.assertEqual(mechanisms_from_option(""), {})
        self.assertEqual(mechanisms_from_option("none"), {})

    def test_unknown_mechanism(self) -> None:
        e = self.assertRaises(ValueError, mechanisms_from_option, "PLAIN,GSSAPI")
        self.assertIn("GSSAPI", str(e))
        self.assertIn("SCRAM-SHA-256", str(e))

    def test_repeated_mechanism(self) -> None:
        self.assertRaises(ValueError, mechanisms_from_option, "PLAIN,plain")

    def test_default_is_secure(self) -> None:
        default = list(mechanisms_from_option(DEFAULT_MECHANISMS))
        self.assertEqual(default[0], "SCRAM-SHA-256")
        self.assertNotIn("DIGEST-MD5", default)
        self.assertLess(default.index("CRAM-MD5"), default.index("PLAIN"))

    def test_missing_services(self) -> None:
        mechs = mechanisms_from_option("OAUTHBEARER,EXTERNAL,PLAIN")
        problems = missing_services(mechs, {}, client_ca=False)
        self.assertEqual(len(problems), 2)
        self.assertEqual(missing_services(mechs, {"token_validator": object()}, client_ca=True), [])
        self.assertEqual(len(missing_services(mechs, {"token_validator": object(),
                                                      "external_identity": "dn"})), 1)

    def test_mechanisms_for_checker(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("a:{PLAIN}x:::::\nb:%s:::::\n" % (hash_password("y", "SCRAM-SHA-256"),))
        self.assertEqual(mechanisms_for_checker(PasswdFileChecker(path)), "SCRAM-SHA-256,PLAIN,LOGIN")
        with open(path, "a") as f:
            f.write("c:%s:::::\n" % (hash_password("z", "SSHA512"),))
        self.assertEqual(mechanisms_for_checker(PasswdFileChecker(path)), "PLAIN,LOGIN")


# ---------------------------------------------------------------------------
# PLAIN, LOGIN, master users
# ---------------------------------------------------------------------------


class Plain(MechanismTestCase):
    def test_initial_response(self) -> None:
        m = PlainMechanism(self.context())
        result = self.step(m, b"\x00alice\x00secret")
        self.assertIsInstance(result, Authenticated)
        creds = result.credentials
        self.assertTrue(IUsernamePassword.providedBy(creds))
        self.assertEqual((creds.username, creds.password), (b"alice", b"secret"))
        self.assertEqual(self.login(creds), "alice")

    def test_wrong_password_is_refused_by_the_checker(self) -> None:
        result = self.step(PlainMechanism(self.context()), b"\x00alice\x00wrong")
        self.assertIsNone(self.login(result.credentials))

    def test_no_initial_response_gets_empty_challenge(self) -> None:
        m = PlainMechanism(self.context())
        self.assertEqual(self.step(m, None), Challenge(b""))
        result = self.step(m, b"alice\x00alice\x00secret")
        self.assertEqual(self.login(result.credentials), "alice")

    def test_malformed(self) -> None:
        for message in [b"", b"alice\x00secret", b"\x00alice\x00", b"\x00\x00secret",
                        b"a\x00b\x00c\x00d", b"\x00al\xffice\x00secret"]:
            self.assertFailed(self.step(PlainMechanism(self.context()), message))

    def test_other_authzid_refused_without_master_rule(self) -> None:
        self.assertFailed(self.step(PlainMechanism(self.context()), b"alice\x00master\x00masterpw"))

    def test_master_user_logs_in_as_target(self) -> None:
        m = PlainMechanism(self.context(services={"master_users": {"master"}}))
        result = self.step(m, b"alice\x00master\x00masterpw")
        self.assertEqual(result, Authenticated(Verified("alice", "PLAIN")))

    def test_master_user_wrong_password(self) -> None:
        m = PlainMechanism(self.context(services={"master_users": {"master"}}))
        self.assertFailed(self.step(m, b"alice\x00master\x00wrong"))

    def test_non_master_cannot_act_for_others(self) -> None:
        m = PlainMechanism(self.context(services={"master_users": {"master"}}))
        self.assertFailed(self.step(m, b"bob\x00alice\x00secret"))

    def test_master_rule_callable(self) -> None:
        rule = lambda master, target: master == "master" and target != "bob"  # noqa: E731
        ok = self.step(PlainMechanism(self.context(services={"master_users": rule})),
                       b"alice\x00master\x00masterpw")
        self.assertEqual(ok.credentials, Verified("alice", "PLAIN"))
        self.assertFailed(self.step(PlainMechanism(self.context(services={"master_users": rule})),
                                    b"bob\x00master\x00masterpw"))

    def test_master_checker_directly(self) -> None:
        checker = MasterUserChecker({"master"}, [self.checker])
        d = checker.requestAvatarId(MasterUserCredentials(b"carol", b"master", b"masterpw"))
        self.assertEqual(self.successResultOf(d), "carol")
        d = checker.requestAvatarId(MasterUserCredentials(b"carol", b"alice", b"secret"))
        self.failureResultOf(d, UnauthorizedLogin)

    def test_no_step_after_the_end(self) -> None:
        m = PlainMechanism(self.context())
        self.step(m, b"\x00alice\x00secret")
        self.assertFailed(self.step(m, b"\x00alice\x00secret"))


class Login(MechanismTestCase):
    def test_two_challenges(self) -> None:
        m = LoginMechanism(self.context())
        self.assertEqual(self.step(m, None), Challenge(b"Username:"))
        self.assertEqual(self.step(m, b"alice"), Challenge(b"Password:"))
        result = self.step(m, b"secret")
        self.assertEqual(self.login(result.credentials), "alice")

    def test_initial_response_is_the_user(self) -> None:
        m = LoginMechanism(self.context())
        self.assertEqual(self.step(m, b"alice"), Challenge(b"Password:"))
        self.assertIsNone(self.login(self.step(m, b"wrong").credentials))

    def test_empty_initial_response(self) -> None:
        self.assertEqual(self.step(LoginMechanism(self.context()), b""), Challenge(b"Username:"))

    def test_empty_user_or_password(self) -> None:
        m = LoginMechanism(self.context())
        self.step(m, None)
        self.assertFailed(self.step(m, b""))
        m = LoginMechanism(self.context())
        self.step(m, b"alice")
        self.assertFailed(self.step(m, b""))


# ---------------------------------------------------------------------------
# CRAM-MD5, DIGEST-MD5
# ---------------------------------------------------------------------------


class CramMD5(MechanismTestCase):
    def exchange(self, user: bytes, password: bytes) -> Any:
        m = CramMD5Mechanism(self.context())
        challenge = self.step(m, None)
        self.assertIsInstance(challenge, Challenge)
        self.assertRegex(challenge.data.decode(), r"^<[0-9]+\.[0-9]+\.[0-9]+@pop\.example>$")
        digest = hmac.new(password, challenge.data, "md5").hexdigest().encode()
        result = self.step(m, user + b" " + digest)
        self.assertIsInstance(result, Authenticated)
        self.assertIsInstance(result.credentials, CramMD5Credentials)
        return self.login(result.credentials)

    def test_plain_secret(self) -> None:
        self.assertEqual(self.exchange(b"alice", b"secret"), "alice")

    def test_cram_md5_context_secret(self) -> None:
        self.assertEqual(self.exchange(b"dave", b"davepw"), "dave")

    def test_wrong_password(self) -> None:
        self.assertIsNone(self.exchange(b"alice", b"wrong"))
        self.assertIsNone(self.exchange(b"dave", b"wrong"))

    def test_hashed_user_cannot_use_it(self) -> None:
        self.assertIsNone(self.exchange(b"frank", b"frankpw"))

    def test_nologin(self) -> None:
        self.assertIsNone(self.exchange(b"eve", b"evepw"))

    def test_challenges_are_unique(self) -> None:
        a = self.step(CramMD5Mechanism(self.context()), None).data
        b = self.step(CramMD5Mechanism(self.context()), None).data
        self.assertNotEqual(a, b)

    def test_initial_response_refused(self) -> None:
        self.assertFailed(self.step(CramMD5Mechanism(self.context()), b"alice 0123"))

    def test_malformed(self) -> None:
        for response in [b"", b"alice", b"alice nothex", b"alice " + b"0" * 31]:
            m = CramMD5Mechanism(self.context())
            self.step(m, None)
            self.assertFailed(self.step(m, response))


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


def _md5hex(data: bytes) -> bytes:
    return hashlib.md5(data).hexdigest().encode()


def digest_client(challenge: bytes, user: str, password: str, *, uri: bytes = b"pop/pop.example",
                  realm: bytes | None = None, nonce: bytes | None = None, nc: bytes = b"00000001",
                  authzid: bytes = b"") -> tuple[bytes, bytes]:
    """An independent RFC 2831 client: (response message, expected rspauth)."""
    fields = dict(re.findall(rb'([a-z-]+)=(?:"([^"]*)"|([^,]*))', challenge) and
                  [(k, a or b) for k, a, b in re.findall(rb'([a-z-]+)=(?:"([^"]*)"|([^,]*))', challenge)])
    realm = fields[b"realm"] if realm is None else realm
    nonce = fields[b"nonce"] if nonce is None else nonce
    cnonce = base64.b64encode(os.urandom(12))
    a1 = _md5(user.encode() + b":" + realm + b":" + password.encode()) + b":" + nonce + b":" + cnonce
    if authzid:
        a1 += b":" + authzid
    tail = b":" + nonce + b":" + nc + b":" + cnonce + b":auth:"
    response = _md5hex(_md5hex(a1) + tail + _md5hex(b"AUTHENTICATE:" + uri))
    rspauth = _md5hex(_md5hex(a1) + tail + _md5hex(b":" + uri))
    message = (b'charset=utf-8,username="' + user.encode() + b'",realm="' + realm + b'",nonce="' + nonce
               + b'",nc=' + nc + b',cnonce="' + cnonce + b'",digest-uri="' + uri + b'",response='
               + response + b",qop=auth")
    if authzid:
        message += b',authzid="' + authzid + b'"'
    return message, b"rspauth=" + rspauth


class DigestMD5(MechanismTestCase):
    def start(self, **services: Any) -> tuple[DigestMD5Mechanism, bytes]:
        m = DigestMD5Mechanism(self.context(services=services))
        challenge = self.step(m, None)
        self.assertIsInstance(challenge, Challenge)
        d = parse_directives(challenge.data)
        self.assertEqual(d["realm"], b"pop.example")
        self.assertEqual(d["qop"], b"auth")
        self.assertEqual(d["algorithm"], b"md5-sess")
        return m, challenge.data

    def test_success_with_rspauth(self) -> None:
        m, challenge = self.start()
        message, rspauth = digest_client(challenge, "alice", "secret")
        self.assertEqual(self.step(m, message), Challenge(rspauth))
        self.assertEqual(self.step(m, b""), Authenticated(Verified("alice", "DIGEST-MD5")))

    def test_wrong_password(self) -> None:
        m, challenge = self.start()
        self.assertFailed(self.step(m, digest_client(challenge, "alice", "wrong")[0]))

    def test_non_plain_user(self) -> None:
        m, challenge = self.start()
        self.assertFailed(self.step(m, digest_client(challenge, "frank", "frankpw")[0]))

    def test_nologin(self) -> None:
        m, challenge = self.start()
        self.assertFailed(self.step(m, digest_client(challenge, "eve", "evepw")[0]))

    def test_service_must_be_pop(self) -> None:
        m, challenge = self.start()
        message = digest_client(challenge, "alice", "secret", uri=b"imap/pop.example")[0]
        self.assertFailed(self.step(m, message))

    def test_host_checked_when_configured(self) -> None:
        m, challenge = self.start(digest_uri_hosts={"pop.example"})
        self.assertFailed(self.step(m, digest_client(challenge, "alice", "secret", uri=b"pop/other")[0]))
        m, challenge = self.start(digest_uri_hosts={"pop.example"})
        self.assertIsInstance(self.step(m, digest_client(challenge, "alice", "secret")[0]), Challenge)

    def test_foreign_nonce(self) -> None:
        m, challenge = self.start()
        message = digest_client(challenge, "alice", "secret", nonce=b"bm9ub25jZQ==")[0]
        self.assertFailed(self.step(m, message))

    def test_replayed_response_in_another_exchange(self) -> None:
        m, challenge = self.start()
        message, _ = digest_client(challenge, "alice", "secret")
        other, _ = self.start()
        self.assertFailed(self.step(other, message))

    def test_nonce_count_must_be_one(self) -> None:
        m, challenge = self.start()
        self.assertFailed(self.step(m, digest_client(challenge, "alice", "secret", nc=b"00000002")[0]))

    def test_wrong_realm(self) -> None:
        m, challenge = self.start()
        self.assertFailed(self.step(m, digest_client(challenge, "alice", "secret", realm=b"evil")[0]))

    def test_authzid(self) -> None:
        m, challenge = self.start()
        self.assertIsInstance(self.step(m, digest_client(challenge, "alice", "secret", authzid=b"alice")[0]),
                              Challenge)
        m, challenge = self.start()
        self.assertFailed(self.step(m, digest_client(challenge, "alice", "secret", authzid=b"bob")[0]))

    def test_acknowledgement_must_be_empty(self) -> None:
        m, challenge = self.start()
        self.step(m, digest_client(challenge, "alice", "secret")[0])
        self.assertFailed(self.step(m, b"x"))

    def test_initial_response_refused(self) -> None:
        self.assertFailed(self.step(DigestMD5Mechanism(self.context()), b"username=x"))

    def test_malformed(self) -> None:
        for junk in [b"username", b'username="x', b"username=a,username=b", b"\xff\xfe"]:
            m, _ = self.start()
            self.assertFailed(self.step(m, junk))

    def test_parse_directives(self) -> None:
        self.assertEqual(parse_directives(b' a=1 , b="x\\"y,z",,c=' + b'""'),
                         {"a": b"1", "b": b'x"y,z', "c": b""})


# ---------------------------------------------------------------------------
# SCRAM
# ---------------------------------------------------------------------------


class Scram(MechanismTestCase):
    def exchange(self, mech: type, user: str, password: str) -> tuple[Any, scramp.ScramClient, Any]:
        m = mech(self.context())
        client = scramp.ScramClient([mech.name], user, password)
        first = self.step(m, client.get_client_first().encode())
        if not isinstance(first, Challenge):
            return m, client, first
        client.set_server_first(first.data.decode())
        final = self.step(m, client.get_client_final().encode())
        return m, client, final

    def succeed(self, mech: type, user: str, password: str) -> None:
        m, client, final = self.exchange(mech, user, password)
        self.assertIsInstance(final, Challenge)
        client.set_server_final(final.data.decode())  # the server proved it knows the keys
        self.assertEqual(self.step(m, b""), Authenticated(Verified(user, mech.name)))

    def test_sha256_derived_from_plain(self) -> None:
        self.succeed(ScramSHA256Mechanism, "alice", "secret")

    def test_sha1_derived_from_plain(self) -> None:
        self.succeed(ScramSHA1Mechanism, "alice", "secret")

    def test_extra_fields(self) -> None:
        self.succeed(ScramSHA256Mechanism, "bob", "bobpw")
        self.succeed(ScramSHA1Mechanism, "bob", "bobpw")

    def test_scram_scheme(self) -> None:
        self.succeed(ScramSHA256Mechanism, "carol", "carolpw")

    def test_no_initial_response(self) -> None:
        m = ScramSHA256Mechanism(self.context())
        self.assertEqual(self.step(m, None), Challenge(b""))
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        self.assertIsInstance(self.step(m, client.get_client_first().encode()), Challenge)

    def test_wrong_password(self) -> None:
        self.assertFailed(self.exchange(ScramSHA256Mechanism, "alice", "wrong")[2])
        self.assertFailed(self.exchange(ScramSHA256Mechanism, "bob", "wrong")[2])

    def test_no_scram_secret(self) -> None:
        # frank has only an SSHA512 hash, carol has no SHA-1 keys, eve may not log in.
        self.assertFailed(self.exchange(ScramSHA256Mechanism, "frank", "frankpw")[2])
        self.assertFailed(self.exchange(ScramSHA1Mechanism, "carol", "carolpw")[2])
        self.assertFailed(self.exchange(ScramSHA256Mechanism, "eve", "evepw")[2])

    def test_unknown_user_gets_a_stable_fake_salt(self) -> None:
        def salt(user: str) -> str:
            m = ScramSHA256Mechanism(self.context())
            client = scramp.ScramClient(["SCRAM-SHA-256"], user, "x")
            first = self.step(m, client.get_client_first().encode()).data.decode()
            return dict(kv.split("=", 1) for kv in first.split(","))["s"]

        self.assertEqual(salt("nobody"), salt("nobody"))
        self.assertNotEqual(salt("nobody"), salt("somebody"))
        self.assertFailed(self.exchange(ScramSHA256Mechanism, "nobody", "x")[2])

    def test_replayed_client_final(self) -> None:
        """A genuine client-final from another exchange does not fit this one's nonce."""
        m = ScramSHA256Mechanism(self.context())
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        first = self.step(m, client.get_client_first().encode())
        client.set_server_first(first.data.decode())
        recorded = client.get_client_final().encode()
        m2 = ScramSHA256Mechanism(self.context())
        client2 = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        self.assertIsInstance(self.step(m2, client2.get_client_first().encode()), Challenge)
        self.assertFailed(self.step(m2, recorded))
        # ... while it was valid for its own exchange.
        self.assertIsInstance(self.step(m, recorded), Challenge)

    def test_tampered_proof(self) -> None:
        m = ScramSHA256Mechanism(self.context())
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        first = self.step(m, client.get_client_first().encode())
        client.set_server_first(first.data.decode())
        final = client.get_client_final()
        head, proof = final.rsplit(",p=", 1)
        raw = bytearray(base64.b64decode(proof))
        raw[0] ^= 1
        self.assertFailed(self.step(m, (head + ",p=" + base64.b64encode(bytes(raw)).decode()).encode()))

    def test_tampered_nonce(self) -> None:
        m = ScramSHA256Mechanism(self.context())
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        first = self.step(m, client.get_client_first().encode())
        client.set_server_first(first.data.decode())
        final = client.get_client_final()
        self.assertFailed(self.step(m, final.replace(",r=", ",r=X", 1).encode()))

    def test_acknowledgement_must_be_empty(self) -> None:
        m, client, final = self.exchange(ScramSHA256Mechanism, "alice", "secret")
        self.assertFailed(self.step(m, b"v=junk"))

    def test_authzid_other_user_refused_without_master_rule(self) -> None:
        m = ScramSHA256Mechanism(self.context())
        self.assertIsInstance(self.step(m, b"n,,n=alice,r=abcdefghijklmnop"), Challenge)
        m = ScramSHA256Mechanism(self.context())
        failed = self.step(m, b"n,a=bob,n=alice,r=abcdefghijklmnop")
        self.assertFailed(failed)
        self.assertEqual(failed.user, "bob")
        for junk in (b"n,a=,n=alice,r=abc", b"n,x=alice,n=alice,r=abc", b"n,a=al=ice,n=alice,r=abc"):
            self.assertFailed(self.step(ScramSHA256Mechanism(self.context()), junk))

    def authzid_exchange(self, mech: type, user: str, password: str, authzid: str,
                         services: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """A whole exchange with C{a=authzid} in the GS2 header (scramp cannot send one)."""
        m = mech(self.context(services=services or {}))
        client = GS2Client(mech.name, user, password, authzid)
        first = self.step(m, client.first())
        if not isinstance(first, Challenge):
            return m, first
        final = self.step(m, client.final(first.data))
        if not isinstance(final, Challenge):
            return m, final
        client.check(final.data)
        return m, self.step(m, b"")

    def test_authzid_equal_to_user(self) -> None:
        """What GNU SASL (NeoMutt) and Cyrus SASL's -u send: n,a=USER,n=USER,..."""
        for mech, user, password in [(ScramSHA256Mechanism, "alice", "secret"),
                                     (ScramSHA1Mechanism, "alice", "secret"),
                                     (ScramSHA256Mechanism, "carol", "carolpw"),
                                     (ScramSHA1Mechanism, "bob", "bobpw")]:
            _, result = self.authzid_exchange(mech, user, password, user)
            self.assertEqual(result, Authenticated(Verified(user, mech.name)), (mech.name, user))

    def test_authzid_equal_to_user_wrong_password(self) -> None:
        _, result = self.authzid_exchange(ScramSHA256Mechanism, "alice", "wrong", "alice")
        self.assertFailed(result)
        self.assertEqual(result.user, "alice")

    def test_authzid_header_must_match_client_final(self) -> None:
        """The proof covers the GS2 header: c= naming another header than the first one fails."""
        m = ScramSHA256Mechanism(self.context())
        client = GS2Client("SCRAM-SHA-256", "alice", "secret", "alice")
        first = self.step(m, client.first())
        client.header = "n,,"
        self.assertFailed(self.step(m, client.final(first.data)))

    def test_master_user_logs_in_as_target(self) -> None:
        services = {"master_users": {"master"}}
        for mech in (ScramSHA256Mechanism, ScramSHA1Mechanism):
            _, result = self.authzid_exchange(mech, "master", "masterpw", "bob", services)
            self.assertEqual(result, Authenticated(Verified("bob", mech.name)))

    def test_master_rule_refuses_after_the_proof(self) -> None:
        services = {"master_users": {"master"}}
        # alice is no master: her right proof still ends in Failed, at the client-final.
        m = ScramSHA256Mechanism(self.context(services=services))
        client = GS2Client("SCRAM-SHA-256", "alice", "secret", "bob")
        first = self.step(m, client.first())
        self.assertIsInstance(first, Challenge)
        result = self.step(m, client.final(first.data))
        self.assertFailed(result)
        self.assertEqual(result.user, "bob")
        # The master with a wrong password fails too.
        self.assertFailed(self.authzid_exchange(ScramSHA256Mechanism, "master", "wrong", "bob", services)[1])

    def test_channel_binding_refused(self) -> None:
        m = ScramSHA256Mechanism(self.context())
        self.assertFailed(self.step(m, b"p=tls-unique,,n=alice,r=abcdefghijklmnop"))

    def test_malformed(self) -> None:
        for junk in [b"", b"n,,", b"x,,n=alice,r=abc", b"n,,n=al=ice,r=abc", b"\xff"]:
            self.assertFailed(self.step(ScramSHA256Mechanism(self.context()), junk))


class GS2Client:
    """
    An independent RFC 5802 client that can put an authzid in the GS2 header
    (C{scramp}'s client cannot): what GNU SASL and Cyrus SASL send.
    """

    def __init__(self, mechanism: str, user: str, password: str, authzid: str = "") -> None:
        self.digest = {"SCRAM-SHA-1": hashlib.sha1, "SCRAM-SHA-256": hashlib.sha256}[mechanism]
        self.name = self.digest().name
        self.password = password.encode("utf-8")
        self.header = "n,a=%s," % (authzid,) if authzid else "n,,"
        self.bare = "n=%s,r=%s" % (user, base64.b64encode(os.urandom(18)).decode())
        self.server_signature = b""

    def first(self) -> bytes:
        return (self.header + self.bare).encode()

    def final(self, server_first: bytes) -> bytes:
        fields = dict(kv.split("=", 1) for kv in server_first.decode().split(","))
        salt = base64.b64decode(fields["s"])
        salted = hashlib.pbkdf2_hmac(self.name, self.password, salt, int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", self.digest).digest()
        without_proof = "c=%s,r=%s" % (base64.b64encode(self.header.encode()).decode(), fields["r"])
        auth = ("%s,%s,%s" % (self.bare, server_first.decode(), without_proof)).encode()
        signature = hmac.new(self.digest(client_key).digest(), auth, self.digest).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.new(salted, b"Server Key", self.digest).digest()
        self.server_signature = hmac.new(server_key, auth, self.digest).digest()
        return ("%s,p=%s" % (without_proof, base64.b64encode(proof).decode())).encode()

    def check(self, server_final: bytes) -> None:
        """The server proved it knows the keys (RFC 5802 section 3, ServerSignature)."""
        assert server_final == b"v=" + base64.b64encode(self.server_signature), server_final


class ScramSecrets(MechanismTestCase):
    def test_scram_secret_sources(self) -> None:
        salt, stored, server, iterations = self.checker.scram_secret("carol", "SCRAM-SHA-256")
        self.assertEqual((stored, server, iterations), scram_keys("carolpw", "SCRAM-SHA-256", salt, 4096)[1:])
        salt, stored, server, iterations = self.checker.scram_secret("bob", "SCRAM-SHA-1")
        self.assertEqual(len(stored), 20)
        self.assertEqual((stored, server), scram_keys("bobpw", "SCRAM-SHA-1", salt, iterations)[1:3])
        self.assertIsNotNone(self.checker.scram_secret("alice", "SCRAM-SHA-256"))

    def test_no_secret(self) -> None:
        for user, mech in [("frank", "SCRAM-SHA-256"), ("eve", "SCRAM-SHA-256"), ("nobody", "SCRAM-SHA-1"),
                           ("carol", "SCRAM-SHA-1"), ("alice", "SCRAM-SHA-512")]:
            self.assertIsNone(self.checker.scram_secret(user, mech), (user, mech))

    def test_sasl_password(self) -> None:
        self.assertEqual(self.checker.sasl_password("alice"), b"secret")
        self.assertIsNone(self.checker.sasl_password("eve"))
        self.assertIsNone(self.checker.sasl_password("frank"))

    def test_scram_keys_match_scramp(self) -> None:
        salt = os.urandom(16)
        for mech in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
            self.assertEqual(scram_keys("pässword", mech, salt, 4096),
                             scramp.ScramMechanism(mech).make_auth_info("pässword", 4096, salt))


# ---------------------------------------------------------------------------
# EXTERNAL
# ---------------------------------------------------------------------------


def make_cert(cn: str = "alice", email: str | None = "alice@example.org") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(days=1)))
    if email:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    return builder.sign(key, hashes.SHA256())


class External(MechanismTestCase):
    def test_common_name(self) -> None:
        m = ExternalMechanism(self.context(peer_certificate=crypto.X509.from_cryptography(make_cert())))
        self.assertEqual(self.step(m, b""), Authenticated(Verified("alice", "EXTERNAL")))

    def test_no_initial_response(self) -> None:
        m = ExternalMechanism(self.context(peer_certificate=make_cert()))
        self.assertEqual(self.step(m, None), Challenge(b""))
        self.assertEqual(self.step(m, b"alice"), Authenticated(Verified("alice", "EXTERNAL")))

    def test_mappings(self) -> None:
        cert = make_cert(cn="Alice Liddell", email="alice@example.org")
        self.assertEqual(certificate_identity(cert, "email"), "alice@example.org")
        self.assertEqual(certificate_identity(cert, "email-localpart"), "alice")
        self.assertEqual(certificate_identity(cert, lambda c: "x"), "x")
        self.assertEqual(certificate_identity(cert, "cn"), "Alice Liddell")
        self.assertIsNone(certificate_identity(make_cert(email=None), "email"))
        self.assertIsNone(certificate_identity(make_cert(cn="../etc"), "cn"))
        self.assertRaises(ValueError, certificate_identity, cert, "dn")
        m = ExternalMechanism(self.context(peer_certificate=cert,
                                           services={"external_identity": "email-localpart"}))
        self.assertEqual(self.step(m, b""), Authenticated(Verified("alice", "EXTERNAL")))

    def test_no_certificate_or_no_tls(self) -> None:
        self.assertFailed(self.step(ExternalMechanism(self.context()), b""))
        self.assertFailed(self.step(ExternalMechanism(self.context(tls=False, peer_certificate=make_cert())),
                                    b""))

    def test_other_authzid_refused(self) -> None:
        m = ExternalMechanism(self.context(peer_certificate=make_cert()))
        self.assertFailed(self.step(m, b"bob"))


# ---------------------------------------------------------------------------
# Tokens: JWTValidator, OAUTHBEARER, XOAUTH2
# ---------------------------------------------------------------------------

NOW = 1_800_000_000
SECRET = b"k" * 32


def claims(**kw: Any) -> dict[str, Any]:
    base = {"sub": "alice", "iss": "https://idp.example", "aud": "pop", "exp": NOW + 300, "iat": NOW - 10}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


class JWT(unittest.TestCase):
    def setUp(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.keys = [JWK.from_public_key(self.rsa.public_key(), "r1"),
                     JWK.from_public_key(self.ec.public_key()), JWK.secret(SECRET, "h1")]
        self.validator = JWTValidator(self.keys, issuer="https://idp.example", audience="pop",
                                      clock=lambda: NOW)

    def user(self, token: str, hint: str | None = None) -> Any:
        d = self.validator.validate(token, hint)
        return self.successResultOf(d.addErrback(lambda f: f.trap(InvalidToken) and f.value))

    def test_algorithms(self) -> None:
        self.assertTrue(ITokenValidator.providedBy(self.validator))
        self.assertEqual(self.user(make_jwt(claims(), self.rsa, "RS256", "r1")), "alice")
        self.assertEqual(self.user(make_jwt(claims(), self.ec, "ES256")), "alice")
        self.assertEqual(self.user(make_jwt(claims(), SECRET, "HS256")), "alice")

    def test_forged_signature(self) -> None:
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.assertIsInstance(self.user(make_jwt(claims(), other, "RS256")), InvalidToken)
        self.assertIsInstance(self.user(make_jwt(claims(), b"x" * 32, "HS256")), InvalidToken)
        token = make_jwt(claims(), self.rsa, "RS256")
        head, payload, sig = token.split(".")
        forged = head + "." + b64url_encode(json.dumps(claims(sub="bob")).encode()) + "." + sig
        self.assertIsInstance(self.user(forged), InvalidToken)

    def test_alg_none_and_key_confusion(self) -> None:
        none = (b64url_encode(b'{"alg":"none"}') + "." + b64url_encode(json.dumps(claims()).encode()) + ".")
        self.assertIsInstance(self.user(none), InvalidToken)
        pem = self.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        self.assertIsInstance(self.user(make_jwt(claims(), pem, "HS256")), InvalidToken)

    def test_time_claims(self) -> None:
        self.assertIsInstance(self.user(make_jwt(claims(exp=NOW - 61), SECRET, "HS256")), InvalidToken)
        self.assertEqual(self.user(make_jwt(claims(exp=NOW - 30), SECRET, "HS256")), "alice")  # leeway
        self.assertIsInstance(self.user(make_jwt(claims(nbf=NOW + 120), SECRET, "HS256")), InvalidToken)
        self.assertIsInstance(self.user(make_jwt(claims(exp=None), SECRET, "HS256")), InvalidToken)
        self.assertIsInstance(self.user(make_jwt(claims(exp="soon"), SECRET, "HS256")), InvalidToken)

    def test_issuer_and_audience(self) -> None:
        self.assertIsInstance(self.user(make_jwt(claims(iss="https://evil"), SECRET, "HS256")), InvalidToken)
        self.assertIsInstance(self.user(make_jwt(claims(aud="imap"), SECRET, "HS256")), InvalidToken)
        self.assertEqual(self.user(make_jwt(claims(aud=["imap", "pop"]), SECRET, "HS256")), "alice")
        self.assertIsInstance(self.user(make_jwt(claims(aud=None), SECRET, "HS256")), InvalidToken)

    def test_user_hint(self) -> None:
        token = make_jwt(claims(), SECRET, "HS256")
        self.assertEqual(self.user(token, "alice"), "alice")
        self.assertIsInstance(self.user(token, "bob"), InvalidToken)

    def test_user_claim_and_map(self) -> None:
        v = JWTValidator(self.keys, user_claim="email", clock=lambda: NOW,
                         user_map=lambda e: e.split("@")[0] if e.endswith("@example.org") else None)
        token = make_jwt(claims(email="alice@example.org"), SECRET, "HS256")
        self.assertEqual(self.successResultOf(v.validate(token, "alice@example.org")), "alice")
        self.assertEqual(self.successResultOf(v.validate(token, "alice")), "alice")
        self.failureResultOf(v.validate(make_jwt(claims(email="a@evil.org"), SECRET, "HS256"), None),
                             InvalidToken)

    def test_malformed(self) -> None:
        for junk in ["", "a.b", "a.b.c", "x" * 20000, "e30.e30.", "!!.e30.AAAA"]:
            self.assertIsInstance(self.user(junk), InvalidToken)

    def test_load_jwks_and_pem(self) -> None:
        def n(i: int) -> str:
            return b64url_encode(i.to_bytes((i.bit_length() + 7) // 8, "big"))

        rnum = self.rsa.public_key().public_numbers()
        enum = self.ec.public_key().public_numbers()
        jwks = {"keys": [{"kty": "RSA", "kid": "r1", "n": n(rnum.n), "e": n(rnum.e), "use": "sig"},
                         {"kty": "EC", "crv": "P-256", "x": n(enum.x), "y": n(enum.y)},
                         {"kty": "RSA", "use": "enc", "n": n(rnum.n), "e": n(rnum.e)}]}
        keys = load_keys(json.dumps(jwks).encode())
        self.assertEqual([k.kty for k in keys], ["RSA", "EC"])
        v = JWTValidator(keys, clock=lambda: NOW)
        self.assertEqual(self.successResultOf(v.validate(make_jwt(claims(), self.rsa, "RS256", "r1"), None)),
                         "alice")
        es256 = make_jwt(claims(), self.ec, "ES256")
        self.assertEqual(self.successResultOf(v.validate(es256, None)), "alice")
        # a kid naming no key we have
        self.failureResultOf(v.validate(make_jwt(claims(), self.rsa, "RS256", "other"), None), InvalidToken)
        pem = self.ec.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(pem)
        v = JWTValidator.from_file(path, clock=lambda: NOW)
        self.assertEqual(self.successResultOf(v.validate(es256, None)), "alice")
        self.assertRaises(ValueError, load_keys, b"nothing")
        self.assertRaises(ValueError, JWK.secret, b"short")

    def test_static_validator(self) -> None:
        v = StaticTokenValidator({"t0k3n": "alice"})
        self.assertEqual(self.successResultOf(v.validate("t0k3n", None)), "alice")
        self.failureResultOf(v.validate("t0k3n", "bob"), InvalidToken)
        self.failureResultOf(v.validate("other", None), InvalidToken)


def oauthbearer(token: str, user: str | None = "alice") -> bytes:
    gs2 = "n,a=%s," % (user,) if user else "n,,"
    return (gs2 + "\x01host=pop.example\x01port=110\x01auth=Bearer " + token + "\x01\x01").encode()


def xoauth2(token: str, user: str = "alice") -> bytes:
    return ("user=" + user + "\x01auth=Bearer " + token + "\x01\x01").encode()


class OAuth(MechanismTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.validator = JWTValidator([JWK.secret(SECRET)], audience="pop", clock=lambda: NOW)
        self.good = make_jwt(claims(), SECRET, "HS256")
        self.expired = make_jwt(claims(exp=NOW - 3600), SECRET, "HS256")

    def ctx(self, **services: Any) -> SASLContext:
        services.setdefault("token_validator", self.validator)
        return self.context(services=services)

    def test_parse(self) -> None:
        self.assertEqual(parse_oauthbearer(oauthbearer("tok")), ("alice", "tok"))
        self.assertEqual(parse_oauthbearer(oauthbearer("tok", None)), (None, "tok"))
        self.assertEqual(parse_xoauth2(xoauth2("tok")), ("alice", "tok"))
        for junk in [b"", b"n,,\x01auth=Bearer t\x01", b"p=x,,\x01auth=Bearer t\x01\x01",
                     b"n,,\x01auth=Basic t\x01\x01", b"n,,\x01host=x\x01\x01",
                     b"n,b=x,\x01auth=Bearer t\x01\x01"]:
            self.assertIsNone(parse_oauthbearer(junk), junk)
        for junk in [b"auth=Bearer t\x01\x01", b"user=a\x01auth=Bearer\x01\x01", b"user=a\x01auth=Bearer t"]:
            self.assertIsNone(parse_xoauth2(junk), junk)

    def test_oauthbearer(self) -> None:
        m = OAuthBearerMechanism(self.ctx())
        self.assertEqual(self.step(m, oauthbearer(self.good)),
                         Authenticated(Verified("alice", "OAUTHBEARER")))

    def test_oauthbearer_without_authzid(self) -> None:
        m = OAuthBearerMechanism(self.ctx())
        self.assertEqual(self.step(m, None), Challenge(b""))
        self.assertEqual(self.step(m, oauthbearer(self.good, None)).credentials.username, "alice")

    def test_oauthbearer_error_then_dummy(self) -> None:
        m = OAuthBearerMechanism(self.ctx(oauth_scope="mail"))
        error = self.step(m, oauthbearer(self.expired))
        self.assertIsInstance(error, Challenge)
        self.assertEqual(json.loads(error.data), {"status": "invalid_token", "schemes": "bearer",
                                                  "scope": "mail"})
        self.assertFailed(self.step(m, b"\x01"))

    def test_oauthbearer_error_needs_dummy(self) -> None:
        m = OAuthBearerMechanism(self.ctx())
        self.step(m, oauthbearer(self.expired))
        self.assertFailed(self.step(m, oauthbearer(self.good)))

    def test_other_user(self) -> None:
        m = OAuthBearerMechanism(self.ctx())
        self.assertIsInstance(self.step(m, oauthbearer(self.good, "bob")), Challenge)
        m = XOAuth2Mechanism(self.ctx())
        self.assertIsInstance(self.step(m, xoauth2(self.good, "bob")), Challenge)

    def test_no_validator(self) -> None:
        m = OAuthBearerMechanism(self.context())
        self.assertIsInstance(self.step(m, oauthbearer(self.good)), Challenge)
        self.assertFailed(self.step(m, b"\x01"))

    def test_xoauth2_one_line(self) -> None:
        m = XOAuth2Mechanism(self.ctx())
        self.assertEqual(self.step(m, xoauth2(self.good)), Authenticated(Verified("alice", "XOAUTH2")))

    def test_xoauth2_two_steps(self) -> None:
        m = XOAuth2Mechanism(self.ctx())
        self.assertEqual(self.step(m, None), Challenge(b""))
        self.assertEqual(self.step(m, xoauth2(self.good)).credentials, Verified("alice", "XOAUTH2"))

    def test_xoauth2_error(self) -> None:
        m = XOAuth2Mechanism(self.ctx())
        error = self.step(m, xoauth2(self.expired))
        self.assertEqual(json.loads(error.data)["status"], "401")
        self.assertFailed(self.step(m, b""))
        self.assertFailed(self.step(m, b""))

    def test_malformed(self) -> None:
        self.assertFailed(self.step(OAuthBearerMechanism(self.ctx()), b"garbage"))
        self.assertFailed(self.step(XOAuth2Mechanism(self.ctx()), b"garbage"))
