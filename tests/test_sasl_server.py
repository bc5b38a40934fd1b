"""
The SASL mechanisms through the real server over loopback sockets: AUTH
exchanges on the wire (RFC 5034), their failures (each ends in -ERR with the
session still usable), and EXTERNAL with TLS client certificates over STLS.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import socket
import ssl
from typing import Any

import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet import ssl as tssl
from twisted.trial import unittest

from popservice.auth.passwdfile import PasswdFileChecker, hash_password, scram_extra_fields
from popservice.auth.tokens import JWK, JWTValidator, make_jwt
from popservice.client.protocol import POP3Client
from popservice.sasl.client import SASLCredentials, ScramSHA256
from popservice.sasl.server import DEFAULT_MECHANISMS, mechanisms_from_option
from popservice.server.factory import ServerConfig, makeServer
from popservice.server.policy import Policy
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, record_events, recv_line, shutdown
from tests.test_sasl_mechanisms import GS2Client, digest_client

MESSAGE = b"Subject: x\n\nbody\n"
SECRET = b"s" * 32
ALL = "SCRAM-SHA-256,SCRAM-SHA-1,EXTERNAL,OAUTHBEARER,XOAUTH2,CRAM-MD5,DIGEST-MD5,PLAIN,LOGIN"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def unb64(line: bytes) -> bytes:
    assert line.startswith(b"+ "), line
    return base64.b64decode(line[2:])


def write_users(path: str) -> None:
    with open(path, "w") as f:
        f.write("alice:{PLAIN}secret:::::\n")
        f.write("bob:%s::::::%s\n" % (hash_password("bobpw", "SSHA512"), scram_extra_fields("bobpw")))
        f.write("master:{PLAIN}masterpw:::::\n")


class SASLServerTestCase(ServerMixin, unittest.TestCase):
    mechanisms = ALL

    def setUp(self) -> None:
        self.passwd = self.mktemp()
        write_users(self.passwd)
        self.checker = PasswdFileChecker(self.passwd)
        self.store = MemoryStore({"alice": [MESSAGE], "bob": [MESSAGE, MESSAGE]})
        self.validator = JWTValidator([JWK.secret(SECRET)], audience="pop")
        self.services: dict[str, Any] = {"token_validator": self.validator, "master_users": {"master"}}
        self.policy = Policy(failure_delay=0)

    def start(self, **config: Any) -> int:
        config.setdefault("sasl", mechanisms_from_option(self.mechanisms))
        config.setdefault("sasl_services", self.services)
        config.setdefault("policy", self.policy)
        config = ServerConfig(hostname="test.example", **config)
        return self.listen(makeServer(self.store, [self.checker], config))

    @defer.inlineCallbacks
    def session(self, **config: Any) -> Any:
        self.start(**config)
        client = yield self.connect()
        return client

    @defer.inlineCallbacks
    def assertAlive(self, client: Any, user: bytes = b"alice", password: bytes = b"secret") -> Any:
        """After a failure: CAPA still answers and a correct login works."""
        status, body = yield client.command_multi(b"CAPA")
        self.assertTrue(status.startswith(b"+OK"), status)
        self.assertIn(b"SASL ", body)
        r = yield client.command(b"AUTH PLAIN " + b64(b"\x00" + user + b"\x00" + password))
        self.assertTrue(r.startswith(b"+OK"), r)
        r = yield client.command(b"STAT")
        self.assertTrue(r.startswith(b"+OK"), r)


class Listing(SASLServerTestCase):
    @defer.inlineCallbacks
    def test_capa_and_bare_auth_list_mechanisms_in_order(self) -> Any:
        client = yield self.session()
        _, body = yield client.command_multi(b"CAPA")
        self.assertIn(b"SASL " + ALL.replace(",", " ").encode() + b"\r\n", body)
        status, body = yield client.command_multi(b"AUTH")
        self.assertTrue(status.startswith(b"+OK"))
        self.assertEqual(body.split(), ALL.encode().split(b","))

    @defer.inlineCallbacks
    def test_plaintext_mechanisms_hidden_without_tls(self) -> Any:
        self.policy = Policy(failure_delay=0, trust_loopback=False)
        client = yield self.session()
        _, body = yield client.command_multi(b"CAPA")
        self.assertIn(b"SASL SCRAM-SHA-256 SCRAM-SHA-1 EXTERNAL CRAM-MD5 DIGEST-MD5\r\n", body)
        for command in [b"AUTH PLAIN " + b64(b"\x00alice\x00secret"), b"AUTH LOGIN", b"AUTH XOAUTH2",
                        b"AUTH OAUTHBEARER"]:
            r = yield client.command(command)
            self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        # SCRAM works without TLS: no password crosses the wire.
        yield self.scram(client, "SCRAM-SHA-256", "alice", "secret")

    @defer.inlineCallbacks
    def scram(self, client: Any, mech: str, user: str, password: str) -> Any:
        c = scramp.ScramClient([mech], user, password)
        first = yield client.command(b"AUTH " + mech.encode() + b" " + b64(c.get_client_first().encode()))
        c.set_server_first(unb64(first).decode())
        final = yield client.command(b64(c.get_client_final().encode()))
        c.set_server_final(unb64(final).decode())
        r = yield client.command(b"")
        return r

    @defer.inlineCallbacks
    def test_default_mechanisms(self) -> Any:
        client = yield self.session(sasl=mechanisms_from_option(DEFAULT_MECHANISMS))
        _, body = yield client.command_multi(b"CAPA")
        self.assertIn(b"SASL SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN\r\n", body)

    @defer.inlineCallbacks
    def test_unknown_mechanism(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH GSSAPI")
        self.assertTrue(r.startswith(b"-ERR"), r)
        yield self.assertAlive(client)


class Plain(SASLServerTestCase):
    @defer.inlineCallbacks
    def test_initial_response(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH PLAIN " + b64(b"\x00alice\x00secret"))
        self.assertEqual(r, b"+OK Logged in, 1 messages")

    @defer.inlineCallbacks
    def test_empty_challenge_then_message(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH PLAIN")
        self.assertEqual(r, b"+ ")
        r = yield client.command(b64(b"alice\x00alice\x00secret"))
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_wrong_password(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH PLAIN " + b64(b"\x00alice\x00wrong"))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_cancel(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH PLAIN")
        self.assertEqual(r, b"+ ")
        r = yield client.command(b"*")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_bad_base64(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH PLAIN !!notbase64")
        self.assertTrue(r.startswith(b"-ERR"), r)
        r = yield client.command(b"AUTH PLAIN")
        r = yield client.command(b"%%%")
        self.assertTrue(r.startswith(b"-ERR"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_empty_initial_response(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH PLAIN =")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_master_user(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH PLAIN " + b64(b"bob\x00master\x00masterpw"))
        self.assertEqual(r, b"+OK Logged in, 2 messages")

    @defer.inlineCallbacks
    def test_authzid_refused_for_ordinary_users(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH PLAIN " + b64(b"bob\x00alice\x00secret"))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_login(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH LOGIN")
        self.assertEqual(unb64(r), b"Username:")
        r = yield client.command(b64(b"bob"))
        self.assertEqual(unb64(r), b"Password:")
        r = yield client.command(b64(b"bobpw"))
        self.assertEqual(r, b"+OK Logged in, 2 messages")

    @defer.inlineCallbacks
    def test_login_wrong_password(self) -> Any:
        client = yield self.session()
        yield client.command(b"AUTH LOGIN " + b64(b"bob"))
        r = yield client.command(b64(b"nope"))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)


class ChallengeResponse(SASLServerTestCase):
    @defer.inlineCallbacks
    def test_cram_md5(self) -> Any:
        import hmac

        client = yield self.session()
        challenge = unb64((yield client.command(b"AUTH CRAM-MD5")))
        self.assertTrue(challenge.startswith(b"<") and challenge.endswith(b"@test.example>"), challenge)
        digest = hmac.new(b"secret", challenge, "md5").hexdigest().encode()
        r = yield client.command(b64(b"alice " + digest))
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_cram_md5_wrong(self) -> Any:
        import hmac

        client = yield self.session()
        challenge = unb64((yield client.command(b"AUTH CRAM-MD5")))
        r = yield client.command(b64(b"alice " + hmac.new(b"x", challenge, "md5").hexdigest().encode()))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        # bob's password is hashed: CRAM-MD5 cannot work for him, whatever he sends
        challenge = unb64((yield client.command(b"AUTH CRAM-MD5")))
        r = yield client.command(b64(b"bob " + hmac.new(b"bobpw", challenge, "md5").hexdigest().encode()))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_digest_md5(self) -> Any:
        client = yield self.session()
        challenge = unb64((yield client.command(b"AUTH DIGEST-MD5")))
        message, rspauth = digest_client(challenge, "alice", "secret", uri=b"pop/test.example")
        r = yield client.command(b64(message))
        self.assertEqual(unb64(r), rspauth)
        r = yield client.command(b"")
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_digest_md5_wrong(self) -> Any:
        client = yield self.session()
        challenge = unb64((yield client.command(b"AUTH DIGEST-MD5")))
        r = yield client.command(b64(digest_client(challenge, "alice", "bad", uri=b"pop/test.example")[0]))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)


class Scram(SASLServerTestCase):
    scram = Listing.scram

    @defer.inlineCallbacks
    def test_sha256_and_sha1(self) -> Any:
        for mech, user, password in [("SCRAM-SHA-256", "alice", "secret"), ("SCRAM-SHA-1", "bob", "bobpw")]:
            client = yield self.session() if mech == "SCRAM-SHA-256" else self.connect()
            r = yield self.scram(client, mech, user, password)
            self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_wrong_password(self) -> Any:
        client = yield self.session()
        c = scramp.ScramClient(["SCRAM-SHA-256"], "bob", "wrong")
        first = yield client.command(b"AUTH SCRAM-SHA-256 " + b64(c.get_client_first().encode()))
        c.set_server_first(unb64(first).decode())
        r = yield client.command(b64(c.get_client_final().encode()))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_replayed_client_final(self) -> Any:
        """A client-final captured on one connection is refused on another."""
        self.start()
        victim = yield self.connect()
        c = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        first = yield victim.command(b"AUTH SCRAM-SHA-256 " + b64(c.get_client_first().encode()))
        c.set_server_first(unb64(first).decode())
        captured = b64(c.get_client_final().encode())
        attacker = yield self.connect()
        c2 = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "whatever")
        yield attacker.command(b"AUTH SCRAM-SHA-256 " + b64(c2.get_client_first().encode()))
        r = yield attacker.command(captured)
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(attacker, b"bob", b"bobpw")
        # The victim's own exchange still completes.
        final = yield victim.command(captured)
        c.set_server_final(unb64(final).decode())
        r = yield victim.command(b"")
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_wrong_state(self) -> Any:
        """A non-empty answer to the server-final ends the exchange with -ERR."""
        client = yield self.session()
        c = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        first = yield client.command(b"AUTH SCRAM-SHA-256 " + b64(c.get_client_first().encode()))
        c.set_server_first(unb64(first).decode())
        yield client.command(b64(c.get_client_final().encode()))
        r = yield client.command(b64(b"again"))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def gs2(self, client: Any, mech: str, user: str, password: str, authzid: str) -> Any:
        """A SCRAM exchange with C{a=authzid} in the GS2 header, as GNU SASL and Cyrus SASL send it."""
        c = GS2Client(mech, user, password, authzid)
        first = yield client.command(b"AUTH " + mech.encode() + b" " + b64(c.first()))
        if not first.startswith(b"+ "):
            return first
        final = yield client.command(b64(c.final(unb64(first))))
        if not final.startswith(b"+ "):
            return final
        c.check(unb64(final))
        r = yield client.command(b"")
        return r

    @defer.inlineCallbacks
    def test_authzid_equal_to_user(self) -> Any:
        """NeoMutt's default login (GNU SASL): n,a=USER,n=USER,... succeeds, no failed login logged."""
        self.start()
        events = record_events(self.factory)
        for mech, user, password, count in [("SCRAM-SHA-256", "alice", "secret", 1),
                                            ("SCRAM-SHA-1", "bob", "bobpw", 2)]:
            client = yield self.connect()
            r = yield self.gs2(client, mech, user, password, user)
            self.assertEqual(r, b"+OK Logged in, %d messages" % (count,))
        self.assertNotIn("login_failed", [name for name, _ in events])
        self.assertEqual([f["method"] for name, f in events if name == "login"],
                         ["SCRAM-SHA-256", "SCRAM-SHA-1"])

    @defer.inlineCallbacks
    def test_authzid_other_user_refused(self) -> Any:
        """Another user's name as authzid: -ERR [AUTH], the attempted name logged, the session lives."""
        self.start()
        events = record_events(self.factory)
        client = yield self.connect()
        r = yield self.gs2(client, "SCRAM-SHA-256", "alice", "secret", "bob")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        failed = [f for name, f in events if name == "login_failed"]
        self.assertEqual([(f["attempted"], f["method"]) for f in failed], [("bob", "SCRAM-SHA-256")])
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_failed_scram_logs_attempted_user(self) -> Any:
        self.start()
        events = record_events(self.factory)
        client = yield self.connect()
        r = yield self.gs2(client, "SCRAM-SHA-256", "alice", "wrong", "alice")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        failed = [f for name, f in events if name == "login_failed"]
        self.assertEqual([f["attempted"] for f in failed], ["alice"])

    @defer.inlineCallbacks
    def test_master_user_authzid(self) -> Any:
        """The master-user rule applies as for PLAIN: master proves its keys, the session is bob's."""
        self.start()
        client = yield self.connect()
        r = yield self.gs2(client, "SCRAM-SHA-256", "master", "masterpw", "bob")
        self.assertEqual(r, b"+OK Logged in, 2 messages")
        self.services["master_users"] = set()
        client = yield self.connect()
        r = yield self.gs2(client, "SCRAM-SHA-1", "master", "masterpw", "bob")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)

    @defer.inlineCallbacks
    def test_own_client(self) -> Any:
        """popservice's client SCRAM-SHA-256 against the server; the client verifies the server."""
        port = self.start()
        client = yield protocol.ClientCreator(reactor, POP3Client).connectTCP("127.0.0.1", port)
        self.addCleanup(lambda: client.transport.abortConnection())
        yield client.greeting
        mech = ScramSHA256(SASLCredentials(username="bob", password="bobpw"))
        yield client.authenticate(mech)
        self.assertTrue(mech.server_verified)
        self.assertTrue(client.logged_in)


class OAuth(SASLServerTestCase):
    def token(self, **claims: Any) -> str:
        import time

        base: dict[str, Any] = {"sub": "alice", "aud": "pop", "exp": int(time.time()) + 300}
        base.update(claims)
        return make_jwt(base, SECRET, "HS256")

    @defer.inlineCallbacks
    def test_oauthbearer(self) -> Any:
        client = yield self.session()
        message = b"n,a=alice,\x01auth=Bearer " + self.token().encode() + b"\x01\x01"
        r = yield client.command(b"AUTH OAUTHBEARER " + b64(message))
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_oauthbearer_expired(self) -> Any:
        import time

        client = yield self.session()
        token = self.token(exp=int(time.time()) - 3600).encode()
        r = yield client.command(b"AUTH OAUTHBEARER " + b64(b"n,,\x01auth=Bearer " + token + b"\x01\x01"))
        self.assertEqual(json.loads(unb64(r))["status"], "invalid_token")
        r = yield client.command(b64(b"\x01"))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_forged_token_for_other_user(self) -> Any:
        client = yield self.session()
        forged = make_jwt({"sub": "bob", "aud": "pop", "exp": 2**33}, b"f" * 32, "HS256").encode()
        r = yield client.command(b"AUTH XOAUTH2 " + b64(b"user=bob\x01auth=Bearer " + forged + b"\x01\x01"))
        self.assertTrue(r.startswith(b"+ "), r)
        r = yield client.command(b"")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        # a valid token for alice does not open bob's mailbox
        r = yield client.command(b"AUTH XOAUTH2 " + b64(b"user=bob\x01auth=Bearer " + self.token().encode()
                                                         + b"\x01\x01"))
        self.assertTrue(r.startswith(b"+ "), r)
        r = yield client.command(b"*")
        self.assertTrue(r.startswith(b"-ERR"), r)
        yield self.assertAlive(client)

    @defer.inlineCallbacks
    def test_xoauth2_two_steps(self) -> Any:
        client = yield self.session()
        r = yield client.command(b"AUTH XOAUTH2")
        self.assertEqual(r, b"+ ")
        r = yield client.command(b64(b"user=alice\x01auth=Bearer " + self.token().encode() + b"\x01\x01"))
        self.assertTrue(r.startswith(b"+OK"), r)


# ---------------------------------------------------------------------------
# EXTERNAL over STLS with client certificates
# ---------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: str, cn: str) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key: Any, ca: x509.Certificate, cn: str, *,
          server: bool = False) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if server:
        san = x509.SubjectAlternativeName([x509.DNSName("localhost")])
        builder = builder.add_extension(san, critical=False)
        usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    else:
        usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    builder = builder.add_extension(usage, critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pem(path: str, key: Any, cert: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
        f.write(cert.public_bytes(serialization.Encoding.PEM))


class External(SASLServerTestCase):
    mechanisms = "EXTERNAL,PLAIN"

    def setUp(self) -> None:
        super().setUp()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca_key, self.ca = make_ca(self.dir, "popservice test CA")
        server_key, server_cert = issue(ca_key, self.ca, "localhost", server=True)
        self.ca_pem = os.path.join(self.dir, "ca.pem")
        with open(self.ca_pem, "wb") as f:
            f.write(self.ca.public_bytes(serialization.Encoding.PEM))
        self.client_pem = os.path.join(self.dir, "alice.pem")
        write_pem(self.client_pem, *issue(ca_key, self.ca, "alice"))
        rogue_key, rogue_ca = make_ca(self.dir, "rogue CA")
        self.rogue_pem = os.path.join(self.dir, "rogue.pem")
        write_pem(self.rogue_pem, *issue(rogue_key, rogue_ca, "alice"))
        from OpenSSL import crypto

        self.tls = tssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(server_key),
            certificate=crypto.X509.from_cryptography(server_cert),
            verify=True, caCerts=[crypto.X509.from_cryptography(self.ca)], requireCertificate=False,
        )

    def run_client(self, port: int, certfile: str | None, commands: list[bytes]) -> list[bytes]:
        """A blocking client in a thread: STLS, optional client certificate, then commands."""
        context = ssl.create_default_context(cafile=self.ca_pem)
        if certfile is not None:
            context.load_cert_chain(certfile)
        out = []
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            recv_line(raw)
            raw.sendall(b"STLS\r\n")
            out.append(recv_line(raw)[:-2])
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                for command in commands:
                    tls.sendall(command + b"\r\n")
                    out.append(recv_line(tls)[:-2])
        return out

    @defer.inlineCallbacks
    def test_client_certificate_logs_in(self) -> Any:
        port = self.start(tls_context=self.tls)
        out = yield threads.deferToThread(self.run_client, port, self.client_pem,
                                          [b"AUTH EXTERNAL =", b"STAT", b"QUIT"])
        self.assertTrue(out[0].startswith(b"+OK"), out)
        self.assertEqual(out[1], b"+OK Logged in, 1 messages")
        self.assertTrue(out[2].startswith(b"+OK 1 "), out)

    @defer.inlineCallbacks
    def test_authzid_and_two_step(self) -> Any:
        port = self.start(tls_context=self.tls)
        out = yield threads.deferToThread(self.run_client, port, self.client_pem,
                                          [b"AUTH EXTERNAL " + b64(b"bob"), b"AUTH EXTERNAL", b64(b"alice")])
        self.assertTrue(out[1].startswith(b"-ERR [AUTH]"), out)
        self.assertEqual(out[2], b"+ ")
        self.assertTrue(out[3].startswith(b"+OK"), out)

    @defer.inlineCallbacks
    def test_no_client_certificate(self) -> Any:
        port = self.start(tls_context=self.tls)
        out = yield threads.deferToThread(self.run_client, port, None,
                                          [b"AUTH EXTERNAL =", b"NOOP",
                                           b"AUTH PLAIN " + b64(b"\x00alice\x00secret")])
        self.assertTrue(out[1].startswith(b"-ERR [AUTH]"), out)
        self.assertTrue(out[3].startswith(b"+OK"), out)

    @defer.inlineCallbacks
    def test_untrusted_client_certificate(self) -> Any:
        port = self.start(tls_context=self.tls)
        try:
            out = yield threads.deferToThread(self.run_client, port, self.rogue_pem,
                                              [b"AUTH EXTERNAL =", b"STAT"])
        except (ssl.SSLError, ConnectionError, OSError):
            return  # the handshake (or the first read after it, TLS 1.3) fails: no login
        self.assertFalse(out[1].startswith(b"+OK"), out)

    @defer.inlineCallbacks
    def test_not_before_tls(self) -> Any:
        client = yield self.session(tls_context=self.tls)
        r = yield client.command(b"AUTH EXTERNAL =")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield self.assertAlive(client)


class ExternalImplicitTLS(External):
    """
    The EXTERNAL tests again on an implicit-TLS (ssl:) listener: with
    --tls-client-ca its TLS asks for client certificates too
    (popservice.tlsutil.ssl_description_options, what ssl: listeners use).
    """

    def start(self, **config: Any) -> int:
        from popservice.tlsutil import ssl_description_options

        server_pem = os.path.join(self.dir, "server.pem")
        with open(server_pem, "wb") as f:
            f.write(crypto.dump_privatekey(crypto.FILETYPE_PEM, self.tls.privateKey))
            f.write(crypto.dump_certificate(crypto.FILETYPE_PEM, self.tls.certificate))
        description = "ssl:0:privateKey=%s:certKey=%s" % (server_pem, server_pem)
        context = ssl_description_options(description, client_ca=self.ca_pem)
        config.pop("tls_context", None)
        config = ServerConfig(hostname="test.example", sasl=mechanisms_from_option(self.mechanisms),
                              sasl_services=self.services, policy=self.policy, **config)
        factory = makeServer(self.store, [self.checker], config)
        port = reactor.listenSSL(0, factory, context, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(shutdown, port, factory)
        return int(port.getHost().port)

    def run_client(self, port: int, certfile: str | None, commands: list[bytes]) -> list[bytes]:
        """Implicit TLS from the first byte (the STLS answer stood at out[0]), certificate, commands."""
        context = ssl.create_default_context(cafile=self.ca_pem)
        if certfile is not None:
            context.load_cert_chain(certfile)
        out = [b"+OK implicit TLS"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                recv_line(tls)
                for command in commands:
                    tls.sendall(command + b"\r\n")
                    out.append(recv_line(tls)[:-2])
        return out

    @defer.inlineCallbacks
    def test_not_before_tls(self) -> Any:
        """There is no plaintext phase here: a client speaking POP3 in the clear gets no greeting."""
        port = self.start()

        def plaintext() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(b"AUTH EXTERNAL =\r\n")
                data = b""
                try:
                    while chunk := raw.recv(4096):
                        data += chunk
                except OSError:
                    pass
                return data

        data = yield threads.deferToThread(plaintext)
        self.assertFalse(data.startswith(b"+OK"), data)
