"""
The server's SASL mechanisms at their edges (popservice.sasl.*): length
limits one octet either side, the exact failure reasons, the parsers'
corner cases, the helpers' choices among several checkers.  Written
against the mutants that survived tests/test_sasl_mechanisms.py and
tests/test_sasl_server.py (bench/mutation/run.py sasl sasl_tokens).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from typing import Any

import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, ssl
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from popservice.auth.credentials import ISASLSecretSource, PlainCredentials
from popservice.auth.tokens import ITokenValidator
from popservice.sasl.base import (
    Authenticated,
    Challenge,
    Failed,
    ISASLVerified,
    SASLContext,
    Verified,
    VerifiedChecker,
)
from popservice.sasl.common import password_checkers, safe_hostname, sasl_password, scram_secret, utf8
from popservice.sasl.cram import CramMD5Mechanism
from popservice.sasl.digest import DigestMD5Mechanism, digest_response, parse_directives
from popservice.sasl.external import ExternalMechanism, certificate_identity, to_cryptography
from popservice.sasl.oauth import OAuthBearerMechanism, XOAuth2Mechanism, parse_oauthbearer, parse_xoauth2
from popservice.sasl.plain import LoginMechanism, MasterUserChecker, PlainMechanism, master_rule
from popservice.sasl.scram import ScramSHA1Mechanism, ScramSHA256Mechanism
from tests.test_sasl_mechanisms import HOST, MechanismTestCase, make_cert


def step(mechanism: Any, response: bytes | None) -> Any:
    """One step; a Deferred answer must already have fired."""
    result = mechanism.step(response)
    if isinstance(result, defer.Deferred):
        out: list[Any] = []
        result.addBoth(out.append)
        assert out, "the step did not finish"
        return out[0]
    return result


@implementer(ISASLSecretSource)
class Secrets:
    """A secret source holding recoverable passwords (what a passwd-file with PLAIN ones is)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, **passwords: bytes) -> None:
        self.passwords = passwords

    def sasl_password(self, user: str) -> bytes | None:
        return self.passwords.get(user)

    def scram_secret(self, user: str, mechanism: str) -> Any:
        password = self.passwords.get(user)
        if password is None:
            return None
        m = scramp.ScramMechanism(mechanism)
        salt, stored, server, iterations = m.make_auth_info(password.decode(), iteration_count=4096,
                                                            salt=b"s" * 16)
        return salt, stored, server, iterations

    def requestAvatarId(self, credentials: Any) -> Any:
        return defer.fail(UnauthorizedLogin())


def context(*checkers: Any, **kw: Any) -> SASLContext:
    kw.setdefault("hostname", HOST)
    kw.setdefault("tls", True)
    return SASLContext(checkers=checkers, **kw)


def digest_message(m: DigestMD5Mechanism, user: str = "alice", password: str = "secret",
                   **override: bytes) -> bytes:
    """A DIGEST-MD5 response to C{m}'s challenge; an override of C{None} leaves that directive out."""
    fields = {"username": user.encode("utf-8"), "realm": HOST.encode(), "nonce": m.nonce,
              "cnonce": b"c1", "nc": b"00000001", "qop": b"auth", "digest-uri": b"pop/" + HOST.encode(),
              "charset": b"utf-8"}
    fields.update(override)
    fields["response"] = override.get("response") or digest_response(
        fields["username"].decode("utf-8" if fields.get("charset") == b"utf-8" else "iso-8859-1"),
        fields["realm"].decode(), password, fields["nonce"], fields["cnonce"], fields["nc"],
        fields["qop"], fields["digest-uri"], fields.get("authzid", b""))
    return b",".join(b'%s="%s"' % (k.encode(), v) for k, v in fields.items() if v is not None)


class Helpers(unittest.TestCase):
    def test_safe_hostname(self) -> None:
        self.assertEqual(safe_hostname("pop.example"), "pop.example")
        self.assertEqual(safe_hostname("a b/c_d"), "abcd")
        self.assertEqual(safe_hostname("x" * 70), "x" * 64)
        self.assertEqual(safe_hostname(""), "localhost")
        self.assertEqual(safe_hostname("!!!"), "localhost")

    def test_utf8(self) -> None:
        self.assertEqual(utf8(b"caf\xc3\xa9"), "caf\xe9")
        self.assertEqual(utf8(b""), "")
        self.assertIsNone(utf8(b"a\x00b"))
        self.assertIsNone(utf8(b"\xff"))

    def test_sources_in_order_first_answer_wins(self) -> None:
        memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"x")
        first, second = Secrets(bob=b"one"), Secrets(alice=b"two", bob=b"three")
        ctx = context(memory, first, second)
        self.assertEqual(sasl_password(ctx, "alice"), b"two")
        self.assertEqual(sasl_password(ctx, "bob"), b"one")
        self.assertIsNone(sasl_password(ctx, "carol"))
        self.assertIsNone(sasl_password(context(memory), "alice"))
        secret = scram_secret(ctx, "alice", "SCRAM-SHA-256")
        self.assertEqual(secret, second.scram_secret("alice", "SCRAM-SHA-256"))
        self.assertIsNone(scram_secret(ctx, "carol", "SCRAM-SHA-256"))

    def test_password_checkers(self) -> None:
        memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"x")
        verified = VerifiedChecker()
        self.assertEqual(password_checkers([verified, memory, object()]), [memory])
        self.assertEqual(password_checkers([]), [])

    def test_verified_is_a_value(self) -> None:
        self.assertEqual(len({Verified("alice", "PLAIN"), Verified("alice", "PLAIN")}), 1)
        self.assertRaises(AttributeError, setattr, Verified("alice", "PLAIN"), "username", "bob")
        self.assertTrue(verifyObject(ICredentialsChecker, MasterUserChecker({"master"}, [])))

    def test_verified_checker(self) -> None:
        self.assertTrue(verifyObject(ICredentialsChecker, VerifiedChecker()))
        self.assertTrue(verifyObject(ISASLVerified, Verified("alice", "EXTERNAL")))
        d = VerifiedChecker().requestAvatarId(Verified("alice", "EXTERNAL"))
        self.assertEqual(self.successResultOf(d), "alice")

    def test_repr_and_flags(self) -> None:
        ctx = context()
        self.assertEqual(repr(PlainMechanism(ctx)), "<PlainMechanism PLAIN>")
        self.assertEqual(repr(ScramSHA1Mechanism(ctx)), "<ScramSHA1Mechanism SCRAM-SHA-1>")
        classes = (PlainMechanism, LoginMechanism, CramMD5Mechanism, DigestMD5Mechanism, ExternalMechanism,
                   ScramSHA256Mechanism, OAuthBearerMechanism, XOAuth2Mechanism)
        flags = {m.name: m.plaintext for m in (cls(ctx) for cls in classes)}
        self.assertEqual(flags, {"PLAIN": True, "LOGIN": True, "CRAM-MD5": False, "DIGEST-MD5": False,
                                 "EXTERNAL": False, "SCRAM-SHA-256": False, "OAUTHBEARER": True,
                                 "XOAUTH2": True})


class Plain(MechanismTestCase):
    def test_lengths(self) -> None:
        long_name, too_long = b"a" * 255, b"a" * 256
        for message, ok in [(b"\x00" + long_name + b"\x00pw", True), (b"\x00" + too_long + b"\x00pw", False),
                            (b"\x00alice\x00" + b"p" * 255, True), (b"\x00alice\x00" + b"p" * 256, False),
                            (b"z" * 255 + b"\x00alice\x00pw", False),  # another user, not malformed
                            (b"z" * 256 + b"\x00alice\x00pw", False)]:
            result = step(PlainMechanism(self.context()), message)
            self.assertEqual(isinstance(result, Authenticated), ok, message[:20])
        self.assertEqual(step(PlainMechanism(self.context()), b"z" * 255 + b"\x00alice\x00pw"),
                         Failed("Authorization identity refused"))
        self.assertEqual(step(PlainMechanism(self.context()), b"z" * 256 + b"\x00alice\x00pw"),
                         Failed("Malformed PLAIN message"))

    def test_authzid_equal_to_authcid(self) -> None:
        result = step(PlainMechanism(self.context()), b"alice\x00alice\x00secret")
        self.assertIsInstance(result.credentials, PlainCredentials)
        self.assertEqual((result.credentials.username, result.credentials.password), (b"alice", b"secret"))

    def test_invalid_utf8_anywhere(self) -> None:
        for message in (b"\xff\x00alice\x00pw", b"\x00alice\x00p\xffw", b"\x00al\xffice\x00pw"):
            self.assertEqual(step(PlainMechanism(self.context()), message), Failed("Malformed PLAIN message"))

    def test_master_rule_forms(self) -> None:
        self.assertIsNone(master_rule(None))
        rule = master_rule(["master"])
        assert rule is not None
        self.assertTrue(rule("master", "anyone"))
        self.assertFalse(rule("alice", "anyone"))
        self.assertRaises(TypeError, master_rule, "master")
        self.assertRaises(TypeError, master_rule, b"master")
        self.assertIs(master_rule(len), len)

    def test_master_checker_edges(self) -> None:
        from popservice.auth.credentials import MasterUserCredentials

        checker = MasterUserChecker({"master"}, [self.checker])
        for target, master in ((b"", b"master"), (b"carol", b""), (b"\xff", b"master")):
            self.failureResultOf(checker.requestAvatarId(MasterUserCredentials(target, master, b"masterpw")),
                                 UnauthorizedLogin)
        nobody = MasterUserChecker({"master"}, [VerifiedChecker()])
        self.failureResultOf(nobody.requestAvatarId(MasterUserCredentials(b"carol", b"master", b"masterpw")),
                             UnauthorizedLogin)

        def broken(master: str, target: str) -> bool:
            raise RuntimeError("rule bug")

        failing = MasterUserChecker(broken, [self.checker])
        self.failureResultOf(failing.requestAvatarId(MasterUserCredentials(b"carol", b"master", b"masterpw")),
                             UnauthorizedLogin)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # two password checkers: a chain, the second one knows the master
        memory = InMemoryUsernamePasswordDatabaseDontUse(master=b"pw2")
        chained = MasterUserChecker({"master"}, [memory, self.checker])
        d = chained.requestAvatarId(MasterUserCredentials(b"carol", b"master", b"masterpw"))
        self.assertEqual(self.successResultOf(d), "carol")

    def test_no_second_step_while_the_master_check_runs(self) -> None:
        """The master's password is checked in a thread: a step meanwhile is out of order."""
        from twisted.internet.threads import deferToThread

        from popservice.auth.passwdfile import PasswdFileChecker, hash_password

        path = self.mktemp()
        with open(path, "w") as f:  # a SHA512-CRYPT hash is no cheap scheme: checked in a thread
            f.write("master:%s:::::\n" % (hash_password("masterpw", "SHA512-CRYPT"),))
        threaded = PasswdFileChecker(path, run_in_thread=deferToThread)
        m = PlainMechanism(self.context(checkers=(threaded,), services={"master_users": {"master"}}))
        pending = m.step(b"alice\x00master\x00masterpw")
        self.assertNoResult(pending)
        self.assertEqual(step(m, b"alice\x00master\x00masterpw"), Failed("Unexpected response"))
        return pending.addCallback(self.assertEqual, Authenticated(Verified("alice", "PLAIN")))

    def test_empty_master_name_refused_before_anything(self) -> None:
        """Even with a rule allowing anyone and a checker knowing an empty user name."""
        from popservice.auth.credentials import MasterUserCredentials

        checker = MasterUserChecker(lambda master, target: True,
                                    [InMemoryUsernamePasswordDatabaseDontUse(**{"": b"pw"})])
        self.failureResultOf(checker.requestAvatarId(MasterUserCredentials(b"carol", b"", b"pw")),
                             UnauthorizedLogin)

    def test_master_password_checked_as_the_master(self) -> None:
        """A checker answering another avatar id than the master's is not trusted."""
        from popservice.auth.credentials import MasterUserCredentials

        class Liar(InMemoryUsernamePasswordDatabaseDontUse):
            def requestAvatarId(self, credentials: Any) -> Any:
                return defer.succeed(b"somebody")

        checker = MasterUserChecker({"master"}, [Liar(master=b"pw")])
        self.failureResultOf(checker.requestAvatarId(MasterUserCredentials(b"carol", b"master", b"pw")),
                             UnauthorizedLogin)
        honest = MasterUserChecker({"master"}, [InMemoryUsernamePasswordDatabaseDontUse(master=b"pw")])
        d = honest.requestAvatarId(MasterUserCredentials(b"carol", b"master", b"pw"))
        self.assertEqual(self.successResultOf(d), "carol")


class Login(MechanismTestCase):
    def test_user_name_lengths(self) -> None:
        m = LoginMechanism(self.context())
        self.assertEqual(step(m, b"u" * 255), Challenge(b"Password:"))
        m = LoginMechanism(self.context())
        self.assertEqual(step(m, b"u" * 256), Failed("Malformed user name"))
        m = LoginMechanism(self.context())
        step(m, None)
        self.assertEqual(step(m, b"   "), Failed("Malformed user name"))
        m = LoginMechanism(self.context())
        self.assertEqual(step(m, b"\xff"), Failed("Malformed user name"))

    def test_password_lengths(self) -> None:
        for password, ok in ((b"p" * 1024, True), (b"p" * 1025, False), (b"\xff", False), (b"a\x00", False)):
            m = LoginMechanism(self.context())
            step(m, b"alice")
            result = step(m, password)
            if ok:
                self.assertEqual(result.credentials.password, password)
            else:
                self.assertEqual(result, Failed("Malformed password"))

    def test_sequence(self) -> None:
        m = LoginMechanism(self.context())
        self.assertEqual(step(m, None), Challenge(b"Username:"))
        self.assertEqual(step(m, None), Failed("Unexpected response"))
        m = LoginMechanism(self.context())
        step(m, b"alice")
        self.assertEqual(step(m, None), Failed("Unexpected response"))
        m = LoginMechanism(self.context())
        step(m, b"alice")
        result = step(m, b"secret")
        self.assertEqual((result.credentials.username, result.credentials.password), (b"alice", b"secret"))
        self.assertEqual(step(m, b"x"), Failed("Unexpected response"))


class Cram(MechanismTestCase):
    def answer(self, user: bytes, password: bytes, *, last: str = "", cut: int = 0) -> Any:
        m = CramMD5Mechanism(self.context())
        challenge = step(m, None).data
        digest = hmac.new(password, challenge, "md5").hexdigest()
        digest = digest[:len(digest) - cut - len(last)] + last
        return m, step(m, user + b" " + digest.encode())

    def test_response_length_limit(self) -> None:
        user = b"u" * (512 - 33)
        _, result = self.answer(user, b"pw")
        self.assertIsInstance(result, Authenticated)
        _, result = self.answer(user + b"u", b"pw")
        self.assertEqual(result, Failed("Malformed CRAM-MD5 response"))

    def test_digest_shape(self) -> None:
        malformed = Failed("Malformed CRAM-MD5 response")
        self.assertEqual(self.answer(b"alice", b"secret", last="g")[1], malformed)
        self.assertEqual(self.answer(b"alice", b"secret", last="/")[1], malformed)
        self.assertEqual(self.answer(b"alice", b"secret", cut=1)[1], malformed)
        self.assertEqual(self.answer(b"alice", b"secret", cut=-1, last="0")[1], malformed)
        self.assertIsInstance(self.answer(b"alice", b"secret", last="")[1], Authenticated)
        m, result = self.answer(b"alice", b"secret")
        self.assertIsInstance(result, Authenticated)
        self.assertEqual(step(m, b"again"), Failed("Unexpected response"))
        m = CramMD5Mechanism(self.context())
        step(m, None)
        self.assertEqual(step(m, None), Failed("Malformed CRAM-MD5 response"))
        m = CramMD5Mechanism(self.context())
        step(m, None)
        self.assertEqual(step(m, b"\xff \xff"), Failed("Malformed CRAM-MD5 response"))
        self.assertEqual(step(CramMD5Mechanism(self.context()), b""),
                         Failed("CRAM-MD5 takes no initial response"))

    def test_challenge_names_the_safe_host(self) -> None:
        m = CramMD5Mechanism(self.context(hostname="bad host/name"))
        self.assertTrue(step(m, None).data.endswith(b"@badhostname>"))


class Digest(MechanismTestCase):
    def start(self, **services: Any) -> tuple[DigestMD5Mechanism, bytes]:
        m = DigestMD5Mechanism(self.context(services=services))
        return m, step(m, None).data

    def message(self, m: DigestMD5Mechanism, user: str = "alice", password: str = "secret",
                **override: bytes) -> bytes:
        return digest_message(m, user, password, **override)

    def test_challenge_exact(self) -> None:
        m, challenge = self.start()
        self.assertEqual(challenge, b'realm="pop.example",nonce="' + m.nonce
                         + b'",qop="auth",charset=utf-8,algorithm=md5-sess')
        self.assertEqual(len(base64.b64decode(m.nonce)), 24)
        quoted = DigestMD5Mechanism(self.context(hostname='a"b\\c'))
        self.assertTrue(step(quoted, None).data.startswith(b'realm="a\\"b\\\\c",'))

    def test_response_matches_rfc_2831_example(self) -> None:
        """RFC 2831 section 4's IMAP example, with its published response and rspauth."""
        args = ("chris", "elwood.innosoft.com", "secret", b"OA6MG9tEQGm2hh", b"OA6MHXh6VqTrRk", b"00000001",
                b"auth", b"imap/elwood.innosoft.com")
        self.assertEqual(digest_response(*args), b"d388dad90d4bbd760a152321f2143af7")
        self.assertEqual(digest_response(*args, server=True), b"ea40f60335c427b5527b84dbabcdfffd")

    def test_success_and_acknowledgement(self) -> None:
        m, _ = self.start()
        result = step(m, self.message(m))
        self.assertIsInstance(result, Challenge)
        self.assertTrue(result.data.startswith(b"rspauth="))
        self.assertEqual(step(m, None), Failed("Unexpected response"))
        m, _ = self.start()
        step(m, self.message(m))
        self.assertEqual(step(m, b""), Authenticated(Verified("alice", "DIGEST-MD5")))
        self.assertEqual(step(m, b""), Failed("Unexpected response"))

    def test_latin1_and_utf8_names(self) -> None:
        source = Secrets(**{"j\xfcrgen": b"pw"})
        for charset in (b"utf-8", None):
            m = DigestMD5Mechanism(SASLContext(hostname=HOST, tls=True, checkers=(source,)))
            step(m, None)
            username = "j\xfcrgen".encode("utf-8" if charset else "iso-8859-1")
            result = step(m, self.message(m, "j\xfcrgen", "pw", username=username, charset=charset))  # type: ignore[arg-type]
            self.assertIsInstance(result, Challenge, charset)
        # a name ISO 8859-1 cannot spell is hashed in UTF-8 (RFC 2831 section 2.1.2.1)
        greek = Secrets(**{"\u03a9": b"pw"})
        omega = DigestMD5Mechanism(SASLContext(hostname=HOST, tls=True, checkers=(greek,)))
        step(omega, None)
        self.assertIsInstance(step(omega, self.message(omega, "\u03a9", "pw")), Challenge)
        m = DigestMD5Mechanism(SASLContext(hostname=HOST, tls=True, checkers=(source,)))
        step(m, None)
        self.assertEqual(step(m, self.message(m, "x", "pw", charset=b"iso-8859-1")),
                         Failed("Malformed DIGEST-MD5 response"))
        m = DigestMD5Mechanism(SASLContext(hostname=HOST, tls=True, checkers=(source,)))
        step(m, None)
        self.assertEqual(step(m, self.message(m, "x", "pw", username=b"\xff", response=b"0" * 32)),
                         Failed("Malformed DIGEST-MD5 response"))

    def test_refusals(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"qop": b"auth-int"}, "Malformed DIGEST-MD5 response"),
            ({"cnonce": b""}, "Malformed DIGEST-MD5 response"),
            ({"username": b""}, "Malformed DIGEST-MD5 response"),
            ({"nc": b"00000002"}, "Malformed DIGEST-MD5 response"),
            ({"realm": b"other"}, "Wrong realm"),
            ({"digest-uri": b"imap/" + HOST.encode()}, "Wrong digest-uri"),
            ({"digest-uri": b"pop/"}, "Wrong digest-uri"),
            ({"digest-uri": b"pop"}, "Wrong digest-uri"),
            ({"authzid": b"bob"}, "Authorization identity refused"),
            ({"nonce": b"Zm9yZWlnbg=="}, "Stale or foreign nonce"),
            ({"response": b"0" * 32}, "Authentication failed"),
        ]
        for override, reason in cases:
            m, _ = self.start()
            self.assertEqual(step(m, self.message(m, **override)), Failed(reason), override)

    def test_utf8_realm(self) -> None:
        m = DigestMD5Mechanism(self.context(hostname="p\xf6p.example"))
        step(m, None)
        realm = "p\xf6p.example".encode()
        message = self.message(m, realm=realm, **{"digest-uri": b"pop/" + realm})
        self.assertIsInstance(step(m, message), Challenge)

    def test_realm_may_be_left_out_and_hosts_are_case_insensitive(self) -> None:
        m, _ = self.start(digest_uri_hosts=["POP.Example"])
        message = self.message(m, realm=b"", **{"digest-uri": b"pop/Pop.EXAMPLE/extra"})
        self.assertIsInstance(step(m, message), Challenge)
        m, _ = self.start(digest_uri_hosts=["other.example"])
        self.assertEqual(step(m, self.message(m)), Failed("Wrong digest-uri"))

    def test_length_limit(self) -> None:
        m, _ = self.start()
        message = self.message(m)
        padded = message + b"," * (4096 - len(message))
        self.assertIsInstance(step(m, padded), Challenge)
        m, _ = self.start()
        message = self.message(m)
        self.assertEqual(step(m, message + b"," * (4097 - len(message))),
                         Failed("DIGEST-MD5 response too long"))

    def test_user_without_recoverable_password(self) -> None:
        m = DigestMD5Mechanism(SASLContext(hostname=HOST, tls=True, checkers=(Secrets(alice=b"\xff"),)))
        step(m, None)
        self.assertEqual(step(m, self.message(m, password="\xff")), Failed())
        m = DigestMD5Mechanism(SASLContext(hostname=HOST, tls=True, checkers=()))
        step(m, None)
        self.assertEqual(step(m, self.message(m)), Failed())

    def test_parse_directives_edges(self) -> None:
        self.assertEqual(parse_directives(b""), {})
        self.assertEqual(parse_directives(b" ,\t,\r\n"), {})
        self.assertEqual(parse_directives(b"A=1"), {"a": b"1"})
        self.assertEqual(parse_directives(b"a= \t1 \t,b=\"q\" ,c=2"), {"a": b"1", "b": b"q", "c": b"2"})
        self.assertEqual(parse_directives(b'a="x\\\\y"'), {"a": b"x\\y"})
        self.assertEqual(parse_directives(b"a=x=y"), {"a": b"x=y"})
        self.assertEqual(parse_directives(b'a=""'), {"a": b""})
        self.assertEqual(parse_directives(b'a= "q",b=\t\t"r",c=  "s"'), {"a": b"q", "b": b"r", "c": b"s"})
        for junk in (b"a", b"ab", b"=1", b"a b=1", b'"a"=1', b'a="x', b'a="x\\', b'a="x"y', b"a=1,a=2",
                     b'a="1" b=2'):
            self.assertRaises(ValueError, parse_directives, junk)


class External(MechanismTestCase):
    def test_identity_characters(self) -> None:
        for cn, user in (("alice", "alice"), ("a\x1fb", None), ("a b", "a b"), ("a/b", None), ("a\\b", None),
                         (".", None), ("..", None), ("...", "..."), ("\x20x", " x")):
            self.assertEqual(certificate_identity(make_cert(cn=cn), "cn"), user, repr(cn))

    def test_forms_of_certificates(self) -> None:
        cert = make_cert()
        der = cert.public_bytes(serialization.Encoding.DER)
        self.assertEqual(to_cryptography(der), cert)
        self.assertEqual(to_cryptography(cert), cert)
        self.assertIsNone(to_cryptography(None))
        twisted_cert = ssl.Certificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM))
        self.assertEqual(to_cryptography(twisted_cert), cert)
        self.assertIsNone(to_cryptography(object()))
        self.assertEqual(certificate_identity(der, None), "alice")
        self.assertIsNone(certificate_identity(None))

    def test_email_from_the_subject(self) -> None:
        def cert(*attributes: x509.NameAttribute) -> x509.Certificate:
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name(list(attributes))
            now = datetime.datetime.now(datetime.UTC)
            return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                    .not_valid_after(now + datetime.timedelta(days=1))
                    .sign(key, hashes.SHA256()))

        one = cert(x509.NameAttribute(NameOID.EMAIL_ADDRESS, "bob@example.org"))
        self.assertEqual(certificate_identity(one, "email"), "bob@example.org")
        self.assertEqual(certificate_identity(one, "email-localpart"), "bob")
        self.assertIsNone(certificate_identity(one, "cn"))
        email, cn = NameOID.EMAIL_ADDRESS, NameOID.COMMON_NAME
        two = cert(x509.NameAttribute(email, "a@x"), x509.NameAttribute(email, "b@x"))
        self.assertIsNone(certificate_identity(two, "email"))
        names = cert(x509.NameAttribute(cn, "a"), x509.NameAttribute(cn, "b"))
        self.assertIsNone(certificate_identity(names, "cn"))
        bare = cert(x509.NameAttribute(NameOID.EMAIL_ADDRESS, "nobody"))
        self.assertEqual(certificate_identity(bare, "email"), "nobody")
        self.assertIsNone(certificate_identity(bare, "email-localpart"))
        self.assertEqual(certificate_identity(make_cert(email="x@y"), "email-localpart"), "x")
        self.assertIsNone(certificate_identity(make_cert(email=None), "email-localpart"))
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(cn, "c")])
        san = x509.SubjectAlternativeName([x509.RFC822Name("first@x"), x509.RFC822Name("second@x")])
        both = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(2).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1)).add_extension(san, critical=False)
                .sign(key, hashes.SHA256()))
        self.assertEqual(certificate_identity(both, "email"), "first@x")

    def test_refusal_reasons(self) -> None:
        cert = make_cert()
        self.assertEqual(step(ExternalMechanism(self.context(peer_certificate=cert)), b"\xff"),
                         Failed("Malformed authorization identity"))
        self.assertEqual(step(ExternalMechanism(self.context(tls=False, peer_certificate=cert)), b""),
                         Failed("No client certificate"))
        self.assertEqual(step(ExternalMechanism(self.context(peer_certificate=make_cert(cn=".."))), b""),
                         Failed("Client certificate not mapped to a user"))
        self.assertEqual(step(ExternalMechanism(self.context(peer_certificate=cert)), b"bob"),
                         Failed("Authorization identity refused"))

        def broken(c: x509.Certificate) -> str:
            raise RuntimeError("mapping bug")

        m = ExternalMechanism(self.context(peer_certificate=cert, services={"external_identity": broken}))
        self.assertEqual(step(m, b""), Failed())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class Scram(MechanismTestCase):
    def exchange(self, mech: type, first: str, user: str = "alice", password: str = "secret",
                 **services: Any) -> tuple[Any, Any, scramp.ScramClient]:
        m = mech(self.context(services=services))
        client = scramp.ScramClient([mech.name], user, password)
        bare = client.get_client_first()[3:]
        server_first = step(m, (first + bare).encode())
        return m, server_first, client

    def final(self, m: Any, client: scramp.ScramClient, server_first: bytes, header: bytes) -> Any:
        client.set_server_first(server_first.decode())
        final = client.get_client_final()
        c = "c=" + base64.b64encode(header).decode()
        final = c + final[final.index(","):]
        # recompute the proof over the header actually sent
        return step(m, final.encode())

    def test_authzid_forms(self) -> None:
        for first in ("n,a=,", "n,a=x=41,", "n,b=alice,"):
            _, result, _ = self.exchange(ScramSHA256Mechanism, first)
            self.assertEqual(result, Failed("Malformed SCRAM message"), first)
        m, result, _ = self.exchange(ScramSHA256Mechanism, "n,a=bob,")
        self.assertEqual(result, Failed("Authorization identity refused", user="bob"))
        m, result, _ = self.exchange(ScramSHA256Mechanism, "n,a=b=2Co=3Db,", master_users={"alice"})
        self.assertIsInstance(result, Challenge)
        self.assertEqual(m._authzid, "b,o=b")

    def test_malformed_client_first(self) -> None:
        m = ScramSHA256Mechanism(self.context())
        self.assertEqual(step(m, b"\xff"), Failed("Malformed SCRAM message"))
        m = ScramSHA256Mechanism(self.context())
        self.assertEqual(step(m, b"n,,"), Failed("Malformed SCRAM message"))
        m = ScramSHA256Mechanism(self.context())
        self.assertEqual(step(m, b"n,"), Failed("Malformed SCRAM message"))

    def test_fake_salt_sizes(self) -> None:
        """Unknown users get a server-first that looks like a real one (16-octet salt, 4096 rounds)."""
        for mech in (ScramSHA1Mechanism, ScramSHA256Mechanism):
            _, first, _ = self.exchange(mech, "n,,", user="nobody")
            fields = dict(f.split("=", 1) for f in first.data.decode().split(","))
            self.assertEqual(len(base64.b64decode(fields["s"])), 16)
            self.assertEqual(fields["i"], "4096")

    def test_client_final_shapes(self) -> None:
        def bad_finals(final: str) -> list[str]:
            binding, nonce, proof = final.split(",")
            return ["", binding + "," + nonce, nonce + "," + binding + "," + proof, binding + "," + proof,
                    "c=!!," + nonce + "," + proof, binding + "," + nonce + ",p=!!",
                    binding + "," + nonce + ",p=AAAA",  # a proof of the wrong length
                    binding + ",r=other," + proof,
                    binding + "!," + nonce + "," + proof,  # base64 with junk: strict decoding
                    binding + "," + nonce + "," + proof[:4] + "!" + proof[4:]]

        for index in range(10):
            m, first, client = self.exchange(ScramSHA256Mechanism, "n,,")
            client.set_server_first(first.data.decode())
            final = client.get_client_final()
            bad = bad_finals(final)[index]
            self.assertEqual(step(m, bad.encode()), Failed(user="alice"), bad)
        m, first, client = self.exchange(ScramSHA256Mechanism, "n,,")
        client.set_server_first(first.data.decode())
        self.assertIsInstance(step(m, client.get_client_final().encode()), Challenge)
        self.assertEqual(step(m, b"x"), Failed("Unexpected response", user="alice"))

    def test_server_signature_and_end(self) -> None:
        m, first, client = self.exchange(ScramSHA1Mechanism, "n,,")
        client.set_server_first(first.data.decode())
        final = step(m, client.get_client_final().encode())
        client.set_server_final(final.data.decode())  # raises when the signature is wrong
        self.assertEqual(step(m, b""), Authenticated(Verified("alice", "SCRAM-SHA-1")))

    def test_secret_source_needed(self) -> None:
        m = ScramSHA256Mechanism(SASLContext(hostname=HOST, tls=True, checkers=()))
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        first = step(m, client.get_client_first().encode())
        client.set_server_first(first.data.decode())
        self.assertEqual(step(m, client.get_client_final().encode()), Failed(user="alice"))

    def test_missing_secret_source_is_logged_once(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def complaints() -> int:
            return sum(1 for e in events if "needs a checker" in str(e.get("log_format", "")))

        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        step(ScramSHA256Mechanism(self.context()), client.get_client_first().encode())
        self.assertEqual(complaints(), 0)
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        step(ScramSHA256Mechanism(SASLContext(hostname=HOST, tls=True)), client.get_client_first().encode())
        self.assertEqual(complaints(), 1)
        m = DigestMD5Mechanism(SASLContext(hostname=HOST, tls=True))
        step(m, None)
        step(m, digest_message(m))
        self.assertEqual(complaints(), 2)
        m = DigestMD5Mechanism(self.context())
        step(m, None)
        step(m, digest_message(m))
        self.assertEqual(complaints(), 2)

    def master_exchange(self, rule: Any) -> Any:
        """alice proves her own keys and asks for carol's mailbox (an independent RFC 5802 client)."""
        m = ScramSHA256Mechanism(self.context(services={"master_users": rule}))
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        bare = client.get_client_first()[3:]
        first = step(m, ("n,a=carol," + bare).encode())
        client.set_server_first(first.data.decode())
        final = client.get_client_final()
        header = base64.b64encode(b"n,a=carol,").decode()
        without_proof = "c=" + header + "," + final.split(",")[1]
        salted = hashlib.pbkdf2_hmac("sha256", b"secret", base64.b64decode(
            dict(f.split("=", 1) for f in first.data.decode().split(","))["s"]), 4096)
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        stored = hashlib.sha256(client_key).digest()
        auth = ",".join((bare, first.data.decode(), without_proof)).encode()
        signature = hmac.new(stored, auth, "sha256").digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True))).decode()
        return m, step(m, (without_proof + ",p=" + proof).encode())

    def test_master_rule_failure_is_a_refusal(self) -> None:
        def broken(master: str, target: str) -> bool:
            raise RuntimeError("rule bug")

        self.assertEqual(self.master_exchange(broken)[1], Failed(user="carol"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_master_login_is_logged_as_such(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        m, final = self.master_exchange({"alice"})
        self.assertIsInstance(final, Challenge)
        self.assertEqual(step(m, b""), Authenticated(Verified("carol", "SCRAM-SHA-256")))
        logins = [(e["master"], e["target"]) for e in events if "logs in as" in e.get("log_format", "")]
        self.assertEqual(logins, [("alice", "carol")])
        self.assertFalse([e for e in events if "refused by the rule" in e.get("log_format", "")])


@implementer(ITokenValidator)
class Validator:
    """A token validator answering C{answer}: a user name, an exception, or a Deferred of its own."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def validate(self, token: str, user_hint: str | None) -> Any:
        if isinstance(self.answer, defer.Deferred):
            return self.answer
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class OAuth(MechanismTestCase):
    def ctx(self, answer: Any = "alice", **services: Any) -> SASLContext:
        services.setdefault("token_validator", Validator(answer))
        return self.context(services=services)

    def test_parsers(self) -> None:
        base = "\x01auth=Bearer tok\x01\x01"
        self.assertEqual(parse_oauthbearer(("y,," + base).encode()), (None, "tok"))
        self.assertEqual(parse_oauthbearer(("n,a=a=2Cb=3Dc," + base).encode()), ("a,b=c", "tok"))
        self.assertEqual(parse_oauthbearer(b"n,,\x01auth=BEARER  tok \x01\x01"), (None, "tok"))
        self.assertEqual(parse_oauthbearer(b"n,,\x01\x01auth=Bearer t\x01\x01"), (None, "t"))
        for junk in ("n,a=," + base, "n,x," + base, "n,,x" + base, "n," + base, "n,,,," + base,
                     "n,,\x01auth=Bearer a b\x01\x01", "n,,\x01auth=Bearer \x01\x01",
                     "n,,\x01auth=Bearer t\x01auth=Bearer u\x01\x01", "n,,\x01au2h=Bearer t\x01\x01",
                     "n,,\x01=x\x01auth=Bearer t\x01\x01", "n,,\x01k\x01auth=Bearer t\x01\x01",
                     "n,,\x01h\xe9st=x\x01auth=Bearer t\x01\x01", "n,,auth=Bearer t\x01\x01"):
            self.assertIsNone(parse_oauthbearer(junk.encode()), junk)
        self.assertIsNone(parse_oauthbearer(b"n,,\x01auth=Bearer t\xff\x01\x01"))
        self.assertEqual(parse_xoauth2(b"user=a\x01auth=Bearer t\x01\x01"), ("a", "t"))
        self.assertIsNone(parse_xoauth2(b"user=\x01auth=Bearer t\x01\x01"))
        self.assertIsNone(parse_xoauth2(b"user=a\x01\x01"))
        self.assertIsNone(parse_xoauth2(b"\xff"))

    def test_message_length_limit(self) -> None:
        def message(size: int) -> bytes:
            head = b"n,,\x01auth=Bearer "
            return head + b"t" * (size - len(head) - 2) + b"\x01\x01"

        self.assertEqual(step(OAuthBearerMechanism(self.ctx()), message(16384)),
                         Authenticated(Verified("alice", "OAUTHBEARER")))
        self.assertEqual(step(OAuthBearerMechanism(self.ctx()), message(16385)),
                         Failed("Malformed OAUTHBEARER message"))
        self.assertEqual(step(XOAuth2Mechanism(self.ctx()), b"x"), Failed("Malformed XOAUTH2 message"))

    def test_validator_answers(self) -> None:
        for answer in ("", None, b"alice", UnauthorizedLogin("expired"), RuntimeError("bug")):
            m = OAuthBearerMechanism(self.ctx(answer))
            result = step(m, b"n,,\x01auth=Bearer t\x01\x01")
            self.assertEqual(json.loads(result.data), {"status": "invalid_token", "schemes": "bearer"},
                             answer)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_error_challenges(self) -> None:
        m = XOAuth2Mechanism(self.ctx(UnauthorizedLogin(), oauth_scope="mail",
                                      oauth_configuration="https://idp/.well-known/openid-configuration"))
        error = step(m, b"user=a\x01auth=Bearer t\x01\x01")
        self.assertEqual(error.data, b'{"status":"401","schemes":"bearer","scope":"mail",'
                         b'"openid-configuration":"https://idp/.well-known/openid-configuration"}')
        self.assertEqual(step(m, b"\x01"), Failed())
        self.assertEqual(step(m, b"\x01"), Failed("Unexpected response"))
        m = OAuthBearerMechanism(self.ctx(UnauthorizedLogin()))
        step(m, b"n,,\x01auth=Bearer t\x01\x01")
        self.assertEqual(step(m, b"\x01"), Failed())
        m = OAuthBearerMechanism(self.ctx(UnauthorizedLogin()))
        step(m, b"n,,\x01auth=Bearer t\x01\x01")
        self.assertEqual(step(m, b""), Failed("Unexpected response"))
        m = OAuthBearerMechanism(self.ctx(UnauthorizedLogin(), token_validator=object()))
        self.assertIsInstance(step(m, b"n,,\x01auth=Bearer t\x01\x01"), Challenge)

    def test_no_step_while_the_token_is_checked(self) -> None:
        pending: defer.Deferred[str] = defer.Deferred()
        m = XOAuth2Mechanism(self.ctx(pending))
        first = m.step(b"user=a\x01auth=Bearer t\x01\x01")
        self.assertNoResult(first)
        self.assertEqual(step(m, b"user=a\x01auth=Bearer t\x01\x01"), Failed("Unexpected response"))
        pending.callback("alice")
        self.assertEqual(self.successResultOf(first), Authenticated(Verified("alice", "XOAUTH2")))

    def test_no_step_after_success(self) -> None:
        m = XOAuth2Mechanism(self.ctx())
        self.assertEqual(step(m, b"user=a\x01auth=Bearer t\x01\x01"),
                         Authenticated(Verified("alice", "XOAUTH2")))
        self.assertEqual(step(m, b"user=a\x01auth=Bearer t\x01\x01"), Failed("Unexpected response"))
