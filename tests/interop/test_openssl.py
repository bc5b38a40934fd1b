"""
openssl s_client against a real C{twistd pop3}: a whole session (USER, PASS,
RETR, QUIT fed on stdin) over STLS and over implicit TLS with certificate and
host name verification; the STARTTLS command-injection defence (data pipelined
after STLS in the clear is discarded); closing after QUIT over TLS.
"""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import subprocess

from twisted.trial import unittest

from tests.interop.world import RawPOP, World, client_context, shared_world, stuff

OPENSSL = shutil.which("openssl")

#: how long s_client may take to finish once the server has answered QUIT
CLOSE_TIMEOUT = 5.0


def build(world: World) -> None:
    world.add_standard_users()


class OpenSSLClientTests(unittest.TestCase):
    skip = None if OPENSSL else "openssl is not installed"

    def setUp(self) -> None:
        self.world = shared_world(__name__, build)
        self.alice = self.world.users["alice"]

    def s_client(self, *args: str, stdin: bytes, cafile: str | None = None) -> tuple[bytes, bytes, bool]:
        """(stdout, stderr, exited by itself) of one s_client run fed C{stdin}."""
        assert OPENSSL
        argv = [
            OPENSSL,
            "s_client",
            "-quiet",
            "-verify_return_error",
            "-CAfile",
            cafile or self.world.cert,
            "-verify_hostname",
            "localhost",
            "-servername",
            "localhost",
            *args,
        ]
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(stdin, timeout=CLOSE_TIMEOUT)
            return out, err, True
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            return out, err, False

    def session_input(self, n: int) -> bytes:
        return b"USER alice\r\nPASS alicepw\r\nRETR %d\r\nQUIT\r\n" % n

    def check_transcript(self, out: bytes, n: int) -> None:
        m = self.alice.messages[n - 1]
        self.assertIn(b"+OK Send your password\r\n+OK Logged in", out)
        expected = b"+OK %d octets\r\n" % m.size + stuff(m.retr) + b".\r\n+OK Bye"
        self.assertIn(expected, out)

    def test_starttls_session(self) -> None:
        out, err, exited = self.s_client(
            "-starttls", "pop3", "-connect", "127.0.0.1:%d" % self.world.port, stdin=self.session_input(2)
        )
        self.assertIn(b"verify return:1", err + out)
        self.check_transcript(out, 2)
        self.assertTrue(
            exited,
            "s_client still running %ss after QUIT: the server did not close the "
            "STLS connection" % CLOSE_TIMEOUT,
        )

    def test_implicit_tls_session(self) -> None:
        out, err, exited = self.s_client(
            "-connect", "127.0.0.1:%d" % self.world.tls_port, stdin=self.session_input(8)
        )
        self.assertIn(b"+OK POP3 server ready", out)
        self.check_transcript(out, 8)
        self.assertTrue(
            exited,
            "s_client still running %ss after QUIT: the server did not close the "
            "TLS connection" % CLOSE_TIMEOUT,
        )

    def test_implicit_tls_large_message(self) -> None:
        out, err, _ = self.s_client(
            "-connect", "127.0.0.1:%d" % self.world.tls_port, stdin=self.session_input(5)
        )
        self.check_transcript(out, 5)

    def test_untrusted_certificate_refused(self) -> None:
        out, err, exited = self.s_client(
            "-connect",
            "127.0.0.1:%d" % self.world.tls_port,
            stdin=b"QUIT\r\n",
            cafile=self.world.untrusted_cert(),
        )
        self.assertTrue(exited)
        self.assertNotIn(b"+OK", out)
        self.assertIn(b"verify error", err + out)


class TLSRawTests(unittest.TestCase):
    """The same properties checked from a raw Python socket, where every byte is visible."""

    def setUp(self) -> None:
        self.world = shared_world(__name__, build)

    def test_pipelined_after_stls_discarded(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.world.port), timeout=10)
        self.addCleanup(sock.close)
        f = sock.makefile("rb")
        self.assertTrue(f.readline().startswith(b"+OK"))
        # one send: STLS and an injected command the attacker hopes runs after the handshake
        sock.sendall(b"STLS\r\nUSER evil\r\n")
        self.assertTrue(f.readline().startswith(b"+OK"))
        # nothing else may come in the clear
        readable, _, _ = select.select([sock], [], [], 0.3)
        self.assertEqual(readable, [], "server sent more data in the clear after STLS +OK")
        tls = client_context(self.world.cert).wrap_socket(sock, server_hostname="localhost")
        tf = tls.makefile("rb")
        tls.sendall(b"CAPA\r\n")
        first = tf.readline()
        self.assertEqual(
            first,
            b"+OK Capability list follows\r\n",
            "first response after the handshake is not the answer to CAPA",
        )
        caps = []
        while True:
            line = tf.readline()
            if line == b".\r\n":
                break
            caps.append(line)
        self.assertNotIn(b"STLS\r\n", caps)
        # USER evil was discarded: PASS has no USER to go with
        tls.sendall(b"PASS alicepw\r\n")
        self.assertTrue(tf.readline().startswith(b"-ERR"))
        tls.sendall(b"USER alice\r\nPASS alicepw\r\nSTAT\r\n")
        self.assertTrue(tf.readline().startswith(b"+OK"))
        self.assertTrue(tf.readline().startswith(b"+OK"))
        self.assertTrue(tf.readline().startswith(b"+OK 11 "))

    def test_injected_login_not_honoured(self) -> None:
        """A whole injected login pipelined after STLS must not log the TLS session in."""
        sock = socket.create_connection(("127.0.0.1", self.world.port), timeout=10)
        self.addCleanup(sock.close)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"STLS\r\nUSER alice\r\nPASS alicepw\r\n")
        self.assertTrue(f.readline().startswith(b"+OK"))
        tls = client_context(self.world.cert).wrap_socket(sock, server_hostname="localhost")
        tf = tls.makefile("rb")
        tls.sendall(b"STAT\r\n")
        self.assertTrue(tf.readline().startswith(b"-ERR"), "STAT answered as if logged in")

    def close_after_quit(self, c: RawPOP) -> None:
        self.assertTrue(c.command(b"QUIT").startswith(b"+OK"))
        c.sock.settimeout(3)
        try:
            data = c.sock.recv(100)
        except TimeoutError:
            self.fail("server did not close the connection within 3 s of answering QUIT")
        except (ssl.SSLEOFError, ConnectionResetError):
            data = b""
        self.assertEqual(data, b"")
        c.close()

    def test_close_after_quit_plain(self) -> None:
        c = self.world.session("alice")
        self.close_after_quit(c)

    def test_close_after_quit_implicit_tls(self) -> None:
        c = self.world.session("alice", tls=True)
        self.close_after_quit(c)

    def test_close_after_quit_stls(self) -> None:
        c = self.world.connect()
        c.stls(self.world.cert)
        c.login("alice", "alicepw")
        self.close_after_quit(c)

    def test_close_after_quit_tls_before_login(self) -> None:
        c = self.world.connect(tls=True)
        self.close_after_quit(c)
