"""
Real SASL clients against an in-process server: curl (PLAIN, LOGIN, CRAM-MD5,
DIGEST-MD5, OAUTHBEARER, XOAUTH2 with --oauth2-bearer) and mpop (GNU SASL:
PLAIN, LOGIN, CRAM-MD5, DIGEST-MD5, SCRAM-SHA-1, SCRAM-SHA-256, OAUTHBEARER,
XOAUTH2).  The clients run as subprocesses through
C{getProcessOutputAndValue} so the reactor keeps serving; the server trusts
loopback, so plaintext mechanisms are offered without TLS.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from zope.interface import implementer

from popservice.auth.passwdfile import PasswdFileChecker, hash_password, scram_extra_fields
from popservice.auth.tokens import JWK, ITokenValidator, JWTValidator, StaticTokenValidator, make_jwt
from popservice.sasl.server import mechanisms_from_option
from popservice.server.factory import ServerConfig, makeServer
from popservice.server.policy import Policy
from popservice.stores.memory import MemoryStore
from tests.support import shutdown

CURL = shutil.which("curl")
MPOP = shutil.which("mpop")
ALL = "SCRAM-SHA-256,SCRAM-SHA-1,OAUTHBEARER,XOAUTH2,CRAM-MD5,DIGEST-MD5,PLAIN,LOGIN"
SECRET = b"interop-test-hs256-secret-32bytes!"
ALICE_MSG = b"Subject: for alice\r\n\r\nalice's body\r\n"
BOB_MSG = b"Subject: for bob\r\n\r\nbob's body\r\n"


@implementer(ITokenValidator)
class JWTOrStatic:
    """JWTs, or the short opaque tokens of L{SHORT_TOKENS}."""

    def __init__(self) -> None:
        self.jwt = JWTValidator([JWK.secret(SECRET)], audience="pop")
        self.static = StaticTokenValidator(SHORT_TOKENS)

    def validate(self, token: str, user_hint: str | None) -> "defer.Deferred[str]":
        if token.count(".") == 2:
            return self.jwt.validate(token, user_hint)
        return self.static.validate(token, user_hint)


SHORT_TOKENS = {"opaque-alice-1": "alice", "opaque-bob-1": "bob"}


class SASLInterop(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.passwd = os.path.join(self.dir, "passwd")
        with open(self.passwd, "w") as f:
            # alice: PLAIN (every mechanism); bob: a one-way hash plus SCRAM keys.
            f.write("alice:{PLAIN}secret:::::\n")
            f.write("bob:%s::::::%s\n" % (hash_password("bobpw", "SSHA512"), scram_extra_fields("bobpw")))
        self.portno = self.serve(ALL)

    def serve(self, mechanisms: str) -> int:
        validator = JWTOrStatic()
        config = ServerConfig(hostname="test.example", sasl=mechanisms_from_option(mechanisms),
                              sasl_services={"token_validator": validator},
                              policy=Policy(failure_delay=0), apop=False)
        factory = makeServer(MemoryStore({"alice": [ALICE_MSG], "bob": [BOB_MSG]}),
                             [PasswdFileChecker(self.passwd)], config)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(shutdown, port, factory)
        return int(port.getHost().port)

    def token(self, user: str = "alice", **claims: Any) -> str:
        base: dict[str, Any] = {"sub": user, "aud": "pop", "exp": int(time.time()) + 300}
        base.update(claims)
        return make_jwt(base, SECRET, "HS256")

    def run_tool(self, executable: str, args: list[str]) -> "defer.Deferred[tuple[bytes, bytes, int]]":
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.dir, "LC_ALL": "C"}
        return getProcessOutputAndValue(executable, args, env=env, path=self.dir)


class Curl(SASLInterop):
    skip = None if CURL else "curl is not installed"

    def curl(self, mechanism: str, user: str, password: str | None = None,
             token: str | None = None) -> "defer.Deferred[tuple[bytes, bytes, int]]":
        assert CURL
        args = ["-sS", "-v", "--max-time", "20", "--login-options", "AUTH=" + mechanism]
        if token is not None:
            args += ["--oauth2-bearer", token, "pop3://%s@127.0.0.1:%d/1" % (user, self.portno)]
        else:
            args += ["pop3://%s:%s@127.0.0.1:%d/1" % (user, password, self.portno)]
        return self.run_tool(CURL, args)

    @defer.inlineCallbacks
    def check(self, mechanism: str, user: str = "alice", password: str | None = "secret",
              token: str | None = None, expected: bytes = ALICE_MSG) -> Any:
        out, err, code = yield self.curl(mechanism, user, password, token)
        self.assertEqual(code, 0, err)
        self.assertIn(b"> AUTH " + mechanism.encode(), err)
        self.assertEqual(out, expected)

    def test_plain(self) -> Any:
        return self.check("PLAIN")

    def test_plain_hashed_password(self) -> Any:
        return self.check("PLAIN", "bob", "bobpw", expected=BOB_MSG)

    def test_login(self) -> Any:
        return self.check("LOGIN", "bob", "bobpw", expected=BOB_MSG)

    def test_cram_md5(self) -> Any:
        return self.check("CRAM-MD5")

    def test_digest_md5(self) -> Any:
        return self.check("DIGEST-MD5")

    def test_oauthbearer(self) -> Any:
        return self.check("OAUTHBEARER", password=None, token=self.token())

    def test_xoauth2(self) -> Any:
        # curl 7.88 picks OAUTHBEARER whenever offered, whatever AUTH= says: offer XOAUTH2 alone.
        self.portno = self.serve("XOAUTH2,PLAIN")
        return self.check("XOAUTH2", "bob", None, token=self.token("bob"), expected=BOB_MSG)

    @defer.inlineCallbacks
    def test_refusals(self) -> Any:
        """Wrong password, CRAM-MD5 for a hashed password, expired and foreign tokens: curl's 67."""
        cases = [("PLAIN", "alice", "wrong", None), ("LOGIN", "alice", "wrong", None),
                 ("CRAM-MD5", "bob", "bobpw", None), ("DIGEST-MD5", "alice", "wrong", None),
                 ("OAUTHBEARER", "alice", None, self.token(exp=int(time.time()) - 3600)),
                 ("OAUTHBEARER", "bob", None, self.token("alice")),
                 ("XOAUTH2", "alice", None, make_jwt({"sub": "alice", "aud": "pop", "exp": 2**33},
                                                     b"x" * 32, "HS256"))]
        for mechanism, user, password, token in cases:
            out, err, code = yield self.curl(mechanism, user, password, token)
            self.assertEqual(code, 67, (mechanism, user, err))
            self.assertIn(b"< -ERR [AUTH]", err)
            self.assertEqual(out, b"")


class Mpop(SASLInterop):
    skip = None if MPOP else "mpop is not installed"

    def mpop(self, auth: str, user: str, secret: str) -> "defer.Deferred[tuple[bytes, bytes, int]]":
        assert MPOP
        rc = os.path.join(self.dir, "mpoprc")
        with open(rc, "w"):
            pass
        os.chmod(rc, 0o600)
        self.maildir = os.path.join(self.dir, "md-" + auth + "-" + user)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.maildir, sub), exist_ok=True)
        secret_file = os.path.join(self.dir, "secret")
        with open(secret_file, "w") as f:
            f.write(secret)
        args = ["-C", rc, "-q", "--host=127.0.0.1", "--port=%d" % (self.portno,), "--tls=off",
                "--auth=" + auth, "--user=" + user, "--passwordeval=cat " + secret_file,
                "--keep=on", "--uidls-file=" + os.path.join(self.dir, "uidls-" + auth + user),
                "--delivery=maildir," + self.maildir]
        return self.run_tool(MPOP, args)

    def delivered(self) -> list[bytes]:
        out = []
        for name in sorted(os.listdir(os.path.join(self.maildir, "new"))):
            with open(os.path.join(self.maildir, "new", name), "rb") as f:
                out.append(f.read())
        return out

    @defer.inlineCallbacks
    def check(self, auth: str, user: str, secret: str) -> Any:
        out, err, code = yield self.mpop(auth, user, secret)
        self.assertEqual(code, 0, err)
        [message] = self.delivered()
        self.assertIn(b"body", message)
        self.assertIn((b"for " + user.encode()), message)

    def test_scram_sha_256_from_stored_keys(self) -> Any:
        return self.check("scram-sha-256", "bob", "bobpw")

    def test_scram_sha_1_from_stored_keys(self) -> Any:
        return self.check("scram-sha-1", "bob", "bobpw")

    def test_scram_sha_256_from_plain(self) -> Any:
        return self.check("scram-sha-256", "alice", "secret")

    def test_plain(self) -> Any:
        return self.check("plain", "bob", "bobpw")

    def test_login(self) -> Any:
        return self.check("login", "alice", "secret")

    def test_cram_md5(self) -> Any:
        return self.check("cram-md5", "alice", "secret")

    def test_digest_md5(self) -> Any:
        return self.check("digest-md5", "alice", "secret")

    def test_oauthbearer(self) -> Any:
        return self.check("oauthbearer", "alice", "opaque-alice-1")

    def test_xoauth2(self) -> Any:
        return self.check("xoauth2", "bob", "opaque-bob-1")

    def test_oauthbearer_jwt(self) -> Any:
        """Regression: mpop sends a >255-octet initial response on the AUTH line (as Dovecot allows)."""
        return self.check("oauthbearer", "alice", self.token())


    @defer.inlineCallbacks
    def test_refusals(self) -> Any:
        cases = [("scram-sha-256", "bob", "wrong"), ("scram-sha-1", "alice", "wrong"),
                 ("cram-md5", "bob", "bobpw"), ("plain", "alice", "wrong"),
                 ("oauthbearer", "bob", "opaque-alice-1"), ("xoauth2", "alice", "opaque-nope")]
        for auth, user, secret in cases:
            out, err, code = yield self.mpop(auth, user, secret)
            self.assertNotEqual(code, 0, (auth, user))
            self.assertIn(b"authentication failed", err, (auth, user))
            self.assertEqual(self.delivered(), [])
