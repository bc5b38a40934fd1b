"""
Server certificates the client must refuse, over real loopback sockets, in
both engines (the Twisted one: C{connect} and C{fetch --engine twisted}; the
blocking one: the default C{fetch}) and in C{probe}: no subjectAltName (with
a CN of another host, and with a CN that names the host: RFC 6125 leaves the
CN out), a DNS SAN of another host, an IP SAN of another address, an
expired certificate, and one signed by a CA that is not trusted.  Each over
STLS and over implicit TLS; in every case popservice's own server, serving
the crafted certificate, records that no USER, PASS, AUTH or APOP arrived:
nothing is sent before the check has passed.  A good certificate, as a
control, logs in.
"""

from __future__ import annotations

import argparse
import datetime
import io
import ipaddress
import os
import subprocess
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from popservice.client import blocking
from popservice.client.common import Credentials, TLSError
from popservice.client.connect import connect
from popservice.client.url import parse_url
from popservice.stores.memory import MemoryStore
from popservice.tap import load_tls_options
from tests.support import ServerMixin, make_factory, memory_checker, record_events, shutdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = b"Subject: tls\n\nbody\n"
PASSWORD = "secret"
#: commands that carry (or prove) a credential
LOGIN_COMMANDS = {"USER", "PASS", "AUTH", "APOP"}


# ---------------------------------------------------------------------------
# Certificates

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key: Any, ca: x509.Certificate, cn: str, names: list[str] | None,
              expired: bool = False) -> tuple[Any, x509.Certificate]:
    """A server certificate signed by C{ca}; C{names}: its SANs (IP or DNS), None: no SAN at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = ((now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if expired
                  else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)))
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if names is not None:
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pem(path: str, *parts: Any) -> str:
    with open(path, "wb") as f:
        for p in parts:
            if isinstance(p, x509.Certificate):
                f.write(p.public_bytes(serialization.Encoding.PEM))
            else:
                f.write(p.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return path


class PKI:
    """A trusted CA (C{ca_pem}), an untrusted one, and the server certificates of the cases."""

    GOOD = ["localhost", "127.0.0.1"]

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        ca_key, ca = make_ca("popservice test CA")
        other_key, other = make_ca("some other CA")
        self.ca_pem = write_pem(os.path.join(directory, "ca.pem"), ca)
        self.other_ca_pem = write_pem(os.path.join(directory, "other-ca.pem"), other)
        self.leaves = {
            "good": make_leaf(ca_key, ca, "localhost", self.GOOD),
            "no_san": make_leaf(ca_key, ca, "other.example", None),
            "no_san_cn_matches": make_leaf(ca_key, ca, "localhost", None),
            "wrong_dns": make_leaf(ca_key, ca, "other.example", ["other.example"]),
            "wrong_ip": make_leaf(ca_key, ca, "localhost", ["127.0.0.2"]),
            "expired": make_leaf(ca_key, ca, "localhost", self.GOOD, expired=True),
            "other_ca": make_leaf(other_key, other, "localhost", self.GOOD),
        }

    def server_options(self, case: str) -> Any:
        key, cert = self.leaves[case]
        cert_pem = write_pem(os.path.join(self.dir, f"{case}.crt"), cert)
        key_pem = write_pem(os.path.join(self.dir, f"{case}.key"), key)
        return load_tls_options(cert_pem, key_pem)


#: (certificate, host the client connects to, what the refusal says)
CASES = [
    ("no_san", "127.0.0.1", "IP address mismatch, certificate is not valid for '127.0.0.1'."),
    ("no_san", "localhost", "Hostname mismatch, certificate is not valid for 'localhost'."),
    ("no_san_cn_matches", "localhost", "Hostname mismatch, certificate is not valid for 'localhost'."),
    ("wrong_dns", "localhost", "Hostname mismatch, certificate is not valid for 'localhost'."),
    ("wrong_ip", "127.0.0.1", "IP address mismatch, certificate is not valid for '127.0.0.1'."),
    ("expired", "127.0.0.1", "certificate has expired"),
    ("expired", "localhost", "certificate has expired"),
    ("other_ca", "127.0.0.1", "unable to get local issuer certificate"),
]


class TLSServers(ServerMixin):
    maxDiff = None
    """popservice's server with one certificate, on a STLS port and an implicit-TLS port."""

    pki: PKI

    def setUp(self) -> None:
        self.pki = PKI(os.path.abspath(self.mktemp()))  # type: ignore[attr-defined]
        self.tmp = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.tmp)

    def serve(self, case: str) -> tuple[dict[str, int], list[tuple[str, dict[str, Any]]]]:
        """Ports (C{"stls"}, C{"tls"}) serving C{case}'s certificate, and the events of both."""
        options = self.pki.server_options(case)
        store = MemoryStore({"alice": [MESSAGE, MESSAGE + b"second\n"]})
        factory = make_factory(store, [memory_checker(alice=PASSWORD)], tls_context=options)
        events = record_events(factory)
        stls = self.listen(factory)
        port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(shutdown, port, factory)  # type: ignore[attr-defined]
        return {"stls": stls, "tls": port.getHost().port}, events

    def url(self, ports: dict[str, int], mode: str, host: str) -> str:
        scheme = "pop3s" if mode == "tls" else "pop3"
        return f"{scheme}://alice@{host}:{ports[mode]}"

    def credentials_seen(self, events: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Every login command (and login) the server saw."""
        out = [f["command"] for name, f in events if name == "command" and f["command"] in LOGIN_COMMANDS]
        return out + [name for name, _ in events if name in ("login", "login_failed")]

    def sent_after_handshake(self, events: list[tuple[str, dict[str, Any]]], stls: int) -> list[str]:
        """
        What the server got beyond C{stls} plaintext CAPA+STLS exchanges: it must
        be nothing, not even a finished handshake (the client aborts it first).
        """
        commands = [f["command"] for name, f in events if name == "command"]
        extra = [c for c in commands if c not in ("CAPA", "STLS")]
        if sorted(commands) != ["CAPA"] * stls + ["STLS"] * stls:
            extra.append(f"commands {commands}")
        return extra + [name for name, _ in events if name in ("tls_established", "login", "login_failed")]

    # -- the two engines, in-process ------------------------------------------------

    @defer.inlineCallbacks
    def twisted_login(self, url: str) -> Any:
        client = yield connect(reactor, url, Credentials("alice", PASSWORD), ca_file=self.pki.ca_pem,
                               timeout=10)
        yield client.quit()

    def blocking_login(self, url: str) -> "defer.Deferred[None]":
        def run() -> None:
            client = blocking.connect(parse_url(url), Credentials("alice", PASSWORD),
                                      ca_file=self.pki.ca_pem, timeout=10)
            client.quit()

        return threads.deferToThread(run)

    def login(self, engine: str, url: str) -> "defer.Deferred[Any]":
        return self.twisted_login(url) if engine == "twisted" else self.blocking_login(url)


def run_cli(*args: str,
            password: str | None = PASSWORD) -> "defer.Deferred[subprocess.CompletedProcess[str]]":
    """C{python -m popservice.client.cli ARGS} in a thread (the reactor serves meanwhile)."""
    env = {k: v for k, v in os.environ.items() if k != "POPSERVICE_PASSWORD"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if password is not None:
        env["POPSERVICE_PASSWORD"] = password
    return threads.deferToThread(
        subprocess.run, [sys.executable, "-m", "popservice.client.cli", *args], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


class CertificateRefusedTests(TLSServers, unittest.TestCase):
    """Each engine refuses each bad certificate before sending anything."""

    @defer.inlineCallbacks
    def check_engine(self, engine: str) -> Any:
        failures = []
        for case, host, reason in CASES:
            ports, events = self.serve(case)
            for mode in ("stls", "tls"):
                url = self.url(ports, mode, host)
                try:
                    yield self.login(engine, url)
                except TLSError as e:
                    expected = f"certificate verification failed for {host}: {reason}"
                    if str(e) != expected:
                        failures.append(f"{case} {host} {mode}: {e!s} != {expected}")
                except Exception as e:
                    failures.append(f"{case} {host} {mode}: {type(e).__name__}: {e}")
                else:
                    failures.append(f"{case} {host} {mode}: accepted")
            seen = self.credentials_seen(events) + self.sent_after_handshake(events, 1)
            if seen:
                failures.append(f"{case} {host}: the server received {seen}")
        self.assertEqual(failures, [])

    def test_twisted_engine(self) -> Any:
        return self.check_engine("twisted")

    def test_blocking_engine(self) -> Any:
        return self.check_engine("blocking")

    @defer.inlineCallbacks
    def test_good_certificate_logs_in(self) -> Any:
        """The control: the same servers with a good certificate get the login, in both engines."""
        ports, events = self.serve("good")
        for engine in ("twisted", "blocking"):
            for mode in ("stls", "tls"):
                for host in ("localhost", "127.0.0.1"):
                    yield self.login(engine, self.url(ports, mode, host))
        logins = [f for name, f in events if name == "login"]
        self.assertEqual([(f["user"], f["tls"]) for f in logins], [("alice", True)] * 8)
        # what the refusals are checked against: a completed handshake is seen by the server
        self.assertEqual([name for name, _ in events].count("tls_established"), 8)


class ProbeTests(TLSServers, unittest.TestCase):
    """C{probe} (in-process, on the test's reactor): every bad certificate is NOT VERIFIED."""

    @defer.inlineCallbacks
    def probe(self, url: str) -> Any:
        from popservice.client.cli_probe import probe

        args = argparse.Namespace(url=url, ca_file=self.pki.ca_pem, insecure=False, starttls="optional",
                                  timeout=10.0)
        out = io.StringIO()
        status = yield probe(reactor, args, out)
        return status, out.getvalue()

    @defer.inlineCallbacks
    def test_bad_certificates_not_verified(self) -> Any:
        failures = []
        for case, host, reason in CASES:
            ports, events = self.serve(case)
            for mode in ("stls", "tls"):
                status, out = yield self.probe(self.url(ports, mode, host))
                expected = ("verified connection failed: TLS: "
                            f"certificate verification failed for {host}: {reason}\n")
                if status != 0 or expected not in out or "certificate (NOT VERIFIED):" not in out \
                        or "certificate (verified)" in out:
                    failures.append(f"{case} {host} {mode}: {status} {out!r}")
            seen = self.credentials_seen(events)
            if seen:
                failures.append(f"{case} {host}: the server received {seen}")
        self.assertEqual(failures, [])

    @defer.inlineCallbacks
    def test_good_certificate_verified(self) -> Any:
        ports, _ = self.serve("good")
        for mode in ("stls", "tls"):
            status, out = yield self.probe(self.url(ports, mode, "localhost"))
            self.assertEqual(status, 0)
            self.assertIn("certificate (verified):", out)
            self.assertNotIn("verified connection failed", out)


#: the cases of the brief, for the (slower) command-line runs
CLI_CASES = [c for c in CASES if (c[0], c[1]) in {("no_san", "127.0.0.1"), ("wrong_dns", "localhost"),
                                                  ("wrong_ip", "127.0.0.1"), ("expired", "127.0.0.1"),
                                                  ("other_ca", "127.0.0.1")}]


class CommandLineRefusalTests(TLSServers, unittest.TestCase):
    """C{fetch} (both engines) and C{probe} from the command line."""

    def fetch_args(self, url: str, engine: str) -> list[str]:
        return ["fetch", url, "--to", f"maildir:{self.tmp}/Mail-{engine}", "--state-dir",
                f"{self.tmp}/state-{engine}", "--ca-file", self.pki.ca_pem, "--engine", engine, "-q",
                "--timeout", "10"]

    @defer.inlineCallbacks
    def test_fetch_refuses_in_both_engines(self) -> Any:
        failures = []
        for case, host, reason in CLI_CASES:
            ports, events = self.serve(case)
            runs = [(mode, engine) for mode in ("stls", "tls") for engine in ("twisted", "blocking")]
            results = yield defer.gatherResults(
                [run_cli(*self.fetch_args(self.url(ports, mode, host), engine)) for mode, engine in runs])
            expected = f"popservice: TLS: certificate verification failed for {host}: {reason}\n"
            for (mode, engine), p in zip(runs, results):
                if (p.returncode, p.stderr) != (1, expected):
                    failures.append(f"{case} {host} {mode} {engine}: {p.returncode} {p.stderr!r}")
            seen = self.credentials_seen(events) + self.sent_after_handshake(events, 2)
            if seen:
                failures.append(f"{case} {host}: the server received {seen}")
        self.assertEqual(failures, [])

    @defer.inlineCallbacks
    def test_probe_command(self) -> Any:
        ports, events = self.serve("no_san")
        p = yield run_cli("probe", self.url(ports, "tls", "127.0.0.1"), "--ca-file", self.pki.ca_pem,
                          password=None)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("verified connection failed: TLS: certificate verification failed for 127.0.0.1: "
                      "IP address mismatch, certificate is not valid for '127.0.0.1'.\n", p.stdout)
        self.assertIn("certificate (NOT VERIFIED):", p.stdout)
        self.assertNotIn("certificate (verified)", p.stdout)
        self.assertEqual(p.stderr, "")
        ports, _ = self.serve("good")
        p = yield run_cli("probe", self.url(ports, "stls", "localhost"), "--ca-file", self.pki.ca_pem,
                          password=None)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("certificate (verified):", p.stdout)
