"""
The PROXY protocol from trusted proxies only (popservice.server.proxy): the
header parser, crafted headers over real sockets, and a real HAProxy
(send-proxy, send-proxy-v2) in front of an in-process server.

Clients bind to 127.0.0.2 (or .3), so the address the server sees through
HAProxy (whose own connections come from 127.0.0.1) tells the two apart.
"""

from __future__ import annotations

import os
import poplib
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
from typing import Any

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.python import usage
from twisted.trial import unittest

from popservice import tap
from popservice.server.policy import Policy, parse_networks
from popservice.server.proxy import (
    V2_SIGNATURE,
    HeaderReader,
    InvalidProxyHeader,
    parse_v1,
    proxy_endpoint,
)
from popservice.stores.memory import MemoryStore
from popservice.tlsutil import make_self_signed
from tests.support import RawClient, make_factory, memory_checker, record_events, recv_line, shutdown

MSG = b"Subject: proxied\n\nhello through the proxy\n"
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)


def v1(source: str = "198.51.100.7", destination: str = "203.0.113.9", sport: int = 40000,
       dport: int = 110) -> bytes:
    family = b"TCP6" if ":" in source else b"TCP4"
    return b"PROXY %s %s %s %d %d\r\n" % (family, source.encode(), destination.encode(), sport, dport)


def v2(source: str = "198.51.100.7", destination: str = "203.0.113.9", sport: int = 40000,
       dport: int = 110, command: int = 1, tlvs: bytes = b"") -> bytes:
    if command == 0:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    block = (socket.inet_pton(family, source) + socket.inet_pton(family, destination)
             + struct.pack("!HH", sport, dport) + tlvs)
    kind = 0x21 if family == socket.AF_INET6 else 0x11
    return V2_SIGNATURE + bytes([0x20 | command, kind]) + struct.pack("!H", len(block)) + block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect_from(source: str, port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


class POP3From(poplib.POP3):
    """poplib with the client socket bound to C{source}."""

    def __init__(self, source: str, port: int) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: Any) -> socket.socket:
        return connect_from(self.source, self.port, timeout)


class POP3SSLFrom(poplib.POP3_SSL):
    def __init__(self, source: str, port: int, context: ssl.SSLContext) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=10, context=context)

    def _create_socket(self, timeout: Any) -> socket.socket:
        return self.context.wrap_socket(connect_from(self.source, self.port, timeout),
                                        server_hostname="localhost")


def peers(events: list[tuple[str, dict[str, Any]]], name: str) -> list[Any]:
    return [fields.get("peer") for event, fields in events if event == name]


class HeaderParsing(unittest.TestCase):
    """The parser alone: v1, v2, any fragmentation, and what it refuses."""

    def feed_bytewise(self, data: bytes) -> Any:
        reader = HeaderReader()
        for i in range(len(data)):
            header = reader.feed(data[i:i + 1])
            if header is not None:
                return header, reader.remaining + data[i + 1:]
        return None, b""

    def test_v1_and_v2_in_any_chunks(self) -> None:
        for raw in (v1(), v2()):
            header, rest = self.feed_bytewise(raw + b"CAPA\r\n")
            self.assertEqual((header.source.host, header.source.port), ("198.51.100.7", 40000))
            self.assertEqual((header.destination.host, header.destination.port), ("203.0.113.9", 110))
            self.assertFalse(header.local)
            self.assertEqual(rest, b"CAPA\r\n")
            reader = HeaderReader()
            self.assertIsNotNone(reader.feed(raw + b"CAPA\r\n"))
            self.assertEqual(reader.remaining, b"CAPA\r\n")

    def test_ipv6_and_mapped(self) -> None:
        for raw in (v1("2001:db8::7", "2001:db8::1"), v2("2001:db8::7", "2001:db8::1")):
            header, _ = self.feed_bytewise(raw)
            self.assertEqual(header.source.type, "TCP")
            self.assertEqual(header.source.host, "2001:db8::7")
        # An IPv4-mapped client is its IPv4 address (one key in the per-address state).
        header, _ = self.feed_bytewise(v2("::ffff:192.0.2.5", "::ffff:192.0.2.1"))
        self.assertEqual(header.source.host, "192.0.2.5")

    def test_v2_tlvs_skipped(self) -> None:
        header, rest = self.feed_bytewise(v2(tlvs=b"\x04\x00\x01x") + b"USER a\r\n")
        self.assertEqual(header.source.host, "198.51.100.7")
        self.assertEqual(rest, b"USER a\r\n")

    def test_local_and_unknown(self) -> None:
        for raw in (v2(command=0), b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n"):
            header, _ = self.feed_bytewise(raw)
            self.assertTrue(header.local)
            self.assertIsNone(header.source)

    def test_invalid(self) -> None:
        for raw in (b"USER alice\r\n", b"PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n",
                    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
                    b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
                    b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
                    b"PROXY " + b"x" * 120 + b"\r\n",
                    V2_SIGNATURE + b"\x10\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a v2 header
                    V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # unknown command
                    V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12,  # UDP
                    V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4):  # truncated addresses
            self.assertRaises(InvalidProxyHeader, self.feed_bytewise, raw)
        self.assertRaises(InvalidProxyHeader, parse_v1, b"HELLO TCP4")


class ProxyTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.tlsdir = os.path.abspath(self.mktemp())
        self.cert, self.key = make_self_signed(self.tlsdir)
        self.context = ssl.create_default_context(cafile=self.cert)
        self.store = MemoryStore({"alice": [MSG]})

    def server(self, trusted: str = "127.0.0.0/8", policy: Policy | None = None, timeout: float = 5.0,
               **config: Any) -> Any:
        from popservice.tap import load_tls_options

        policy = policy if policy is not None else Policy(failure_delay=0, allow_plaintext_auth=True)
        self.factory = make_factory(self.store, [memory_checker(alice="secret")], policy=policy,
                                    tls_context=load_tls_options(self.cert, self.key), **config)
        self.events = record_events(self.factory)
        self.trusted = parse_networks(trusted)
        self.timeout = timeout
        return self.factory

    @defer.inlineCallbacks
    def listen(self, description: str = "tcp:0:interface=127.0.0.1") -> Any:
        """Listen with the PROXY layer on C{description}; return the port number."""
        if description.startswith("ssl:"):
            description = "ssl:0:privateKey=%s:certKey=%s:interface=127.0.0.1" % (self.key, self.cert)
        port = yield proxy_endpoint(description, self.trusted, self.timeout).listen(self.factory)
        self.addCleanup(shutdown, port, self.factory)
        return port.getHost().port

    @defer.inlineCallbacks
    def raw(self, port: int, source: str = "127.0.0.1") -> Any:
        client = yield protocol.ClientCreator(reactor, RawClient).connectTCP(
            "127.0.0.1", port, bindAddress=(source, 0))
        self.addCleanup(self.drop, client)
        return client

    def drop(self, client: RawClient) -> Any:
        if client.closed:
            return None
        client.transport.abortConnection()  # type: ignore[union-attr]
        return client.lost

    def blocking(self, f: Any, *args: Any) -> Any:
        return threads.deferToThread(f, *args)


class CraftedHeaders(ProxyTestCase):
    """Headers written by the test itself over real sockets (no HAProxy needed)."""

    @defer.inlineCallbacks
    def test_v1_header_gives_peer_and_host(self) -> Any:
        self.server()
        port = yield self.listen()
        client = yield self.raw(port)
        # The header and the first commands in one write: the rest goes to the server.
        client.send(v1() + b"USER alice\r\nPASS secret\r\n")
        self.assertTrue((yield client.line()).startswith(b"+OK"))
        self.assertTrue((yield client.line()).startswith(b"+OK"))
        self.assertTrue((yield client.line()).startswith(b"+OK"))
        [server] = list(self.factory.connections)
        transport: Any = server.transport
        self.assertEqual(server.peer_host, "198.51.100.7")
        self.assertEqual((transport.getPeer().host, transport.getPeer().port), ("198.51.100.7", 40000))
        self.assertEqual((transport.getHost().host, transport.getHost().port), ("203.0.113.9", 110))
        self.assertEqual(peers(self.events, "connect"), ["198.51.100.7"])
        self.assertEqual(peers(self.events, "login"), ["198.51.100.7"])
        # The rest of the transport passes through to the socket.
        tcp = transport.transport
        self.assertIs(tcp.producer, server)  # registerProducer
        transport.pauseProducing()
        self.assertNotIn(tcp, reactor.getReaders())
        transport.resumeProducing()
        self.assertIn(tcp, reactor.getReaders())
        self.assertTrue(tcp.getTcpNoDelay())
        r, body = yield client.command_multi(b"RETR 1")
        self.assertIn(b"hello through the proxy", body)
        self.assertTrue((yield client.command(b"QUIT")).startswith(b"+OK"))
        yield client.lost
        self.assertEqual(peers(self.events, "logout"), ["198.51.100.7"])

    @defer.inlineCallbacks
    def test_v2_header_ipv6_in_pieces(self) -> Any:
        self.server()
        port = yield self.listen()
        client = yield self.raw(port)
        header = v2("2001:db8::7", "2001:db8::1")
        for i in range(0, len(header), 7):
            client.send(header[i:i + 7])
            yield task.deferLater(reactor, 0.005, lambda: None)
        self.assertTrue((yield client.line()).startswith(b"+OK"))
        self.assertEqual(peers(self.events, "connect"), ["2001:db8::7"])

    @defer.inlineCallbacks
    def test_trusted_without_header_is_closed(self) -> Any:
        self.server()
        port = yield self.listen()
        client = yield self.raw(port)
        client.send(b"USER alice\r\n")
        yield client.lost
        self.assertEqual(client.buffer, b"")  # not even a greeting
        self.assertEqual(self.events, [])
        self.assertEqual(self.factory.peers.total, 0)

    @defer.inlineCallbacks
    def test_invalid_header_is_closed(self) -> Any:
        self.server()
        port = yield self.listen()
        client = yield self.raw(port)
        client.send(b"PROXY TCP4 1.2.3.4 999.0.0.1 1 2\r\n")
        yield client.lost
        self.assertEqual((client.buffer, self.events), (b"", []))

    @defer.inlineCallbacks
    def test_header_deadline(self) -> Any:
        self.server(timeout=0.3)
        port = yield self.listen()
        client = yield self.raw(port)
        started = time.monotonic()
        client.send(b"PROXY TCP4 ")  # a header that never ends
        yield client.lost
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertEqual((client.buffer, self.events), (b"", []))

    @defer.inlineCallbacks
    def test_local_command_closed_quietly(self) -> Any:
        self.server()
        port = yield self.listen()
        for health_check in (v2(command=0), b"PROXY UNKNOWN\r\n"):
            client = yield self.raw(port)
            client.send(health_check)
            yield client.lost
            self.assertEqual(client.buffer, b"")
        self.assertEqual(self.events, [])

    @defer.inlineCallbacks
    def test_untrusted_peer_is_a_direct_client(self) -> Any:
        self.server(trusted="127.0.0.3/32")
        port = yield self.listen()
        client = yield self.raw(port, source="127.0.0.1")
        self.assertTrue((yield client.line()).startswith(b"+OK"))  # greeted at once
        answer = yield client.command(v1().rstrip(b"\r\n"))
        self.assertTrue(answer.startswith(b"-ERR"), answer)
        self.assertTrue((yield client.command(b"USER alice")).startswith(b"+OK"))
        self.assertTrue((yield client.command(b"PASS secret")).startswith(b"+OK"))
        self.assertEqual(set(peers(self.events, "connect") + peers(self.events, "login")), {"127.0.0.1"})
        # A v2 header is no better: bad commands, then the "QUIT\n" its
        # signature carries for servers that do not speak PROXY ends the session.
        other = yield self.raw(port, source="127.0.0.1")
        self.assertTrue((yield other.line()).startswith(b"+OK"))
        other.send(v2())
        yield other.lost
        answers = other.buffer.split(b"\r\n")
        self.assertEqual(answers[:2], [b"-ERR Unknown command"] * 2)
        self.assertTrue(answers[-2].startswith(b"+OK"), answers)
        self.assertEqual(peers(self.events, "login"), ["127.0.0.1"])

    def stls_session(self, port: int) -> tuple[bytes, bytes]:
        with connect_from("127.0.0.1", port) as raw:
            raw.sendall(v2("192.0.2.44", "192.0.2.1"))
            recv_line(raw)
            raw.sendall(b"STLS\r\n")
            recv_line(raw)
            with self.context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"USER alice\r\nPASS secret\r\n")
                recv_line(tls)
                answer = recv_line(tls)
                tls.sendall(b"QUIT\r\n")
                quit = recv_line(tls)
                self.assertEqual(tls.recv(100), b"")  # the server closes after QUIT
        return answer, quit

    @defer.inlineCallbacks
    def test_stls_after_header(self) -> Any:
        self.server()
        port = yield self.listen()
        answer, quit = yield self.blocking(self.stls_session, port)
        self.assertTrue(answer.startswith(b"+OK") and quit.startswith(b"+OK"), (answer, quit))
        self.assertEqual(peers(self.events, "stls"), ["192.0.2.44"])
        self.assertEqual(peers(self.events, "tls_established"), ["192.0.2.44"])
        self.assertEqual([f["tls"] for e, f in self.events if e == "login"], [True])

    def implicit_session(self, port: int) -> bytes:
        with connect_from("127.0.0.1", port) as raw:
            raw.sendall(v1("192.0.2.45", "192.0.2.1", 5555, 995))
            with self.context.wrap_socket(raw, server_hostname="localhost") as tls:
                recv_line(tls)
                tls.sendall(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
                recv_line(tls)
                answer = recv_line(tls)
                recv_line(tls)
                self.assertEqual(tls.recv(100), b"")
        return answer

    @defer.inlineCallbacks
    def test_implicit_tls_after_header(self) -> Any:
        self.server()
        port = yield self.listen("ssl:")
        answer = yield self.blocking(self.implicit_session, port)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertEqual([(f["peer"], f["tls"]) for e, f in self.events if e == "connect"],
                         [("192.0.2.45", True)])

    def implicit_direct(self, port: int) -> bytes:
        with connect_from("127.0.0.1", port) as raw:
            with self.context.wrap_socket(raw, server_hostname="localhost") as tls:
                return recv_line(tls)

    @defer.inlineCallbacks
    def test_implicit_tls_untrusted_direct(self) -> Any:
        self.server(trusted="127.0.0.3/32")
        port = yield self.listen("ssl:")
        greeting = yield self.blocking(self.implicit_direct, port)
        self.assertTrue(greeting.startswith(b"+OK"))
        self.assertEqual(peers(self.events, "connect"), ["127.0.0.1"])


class TapOption(unittest.TestCase):
    """C{twistd pop3 --proxy-trusted-networks}."""

    def test_help_shows_option(self) -> None:
        self.assertIn("--proxy-trusted-networks", str(tap.Options()))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out = subprocess.run([twistd, "pop3", "--help"], capture_output=True, text=True, timeout=60)
        self.assertIn("--proxy-trusted-networks", out.stdout)

    def test_parsed_and_checked(self) -> None:
        options = tap.Options()
        options.parseOptions(["--auth", "memory:a:b", "--proxy-trusted-networks", "10.0.0.0/8, ::1"])
        self.assertEqual([str(n) for n in options["proxy-trusted-networks"]], ["10.0.0.0/8", "::1/128"])
        self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                          ["--auth", "memory:a:b", "--proxy-trusted-networks", "nonsense"])

    @defer.inlineCallbacks
    def test_service_listens_with_proxy_layer(self) -> Any:
        from tests.test_tap import make_maildir

        root = os.path.abspath(self.mktemp())
        make_maildir(root, "alice", [MSG])
        cert, key = make_self_signed(os.path.join(root, "tls"))
        port, tls_port = free_port(), free_port()
        options = tap.Options()
        options.parseOptions(["--mail", "maildir:%s/%%u" % root, "--auth", "memory:alice:secret",
                              "--proxy-trusted-networks", "127.0.0.0/8",
                              "--listen", "tcp:%d:interface=127.0.0.1" % port,
                              "--listen", "ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1" % (
                                  tls_port, key, cert)])
        top = tap.makeService(options)
        services = list(top)
        factory = services[0].factory
        events = record_events(factory)
        top.startService()
        self.addCleanup(top.stopService)
        context = ssl.create_default_context(cafile=cert)

        def session() -> tuple[bytes, bytes]:
            with connect_from("127.0.0.1", port) as raw:
                raw.sendall(b"CAPA\r\n")
                refused = read_all(raw)
            with connect_from("127.0.0.1", tls_port) as raw:
                raw.sendall(v2("192.0.2.80", "192.0.2.1"))
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    greeting = recv_line(tls)
                    tls.sendall(b"QUIT\r\n")
                    recv_line(tls)
            return refused, greeting

        refused, greeting = yield threads.deferToThread(session)
        self.assertEqual(refused, b"")
        self.assertTrue(greeting.startswith(b"+OK"))
        self.assertEqual([(f["peer"], f["tls"]) for e, f in events if e == "connect"], [("192.0.2.80", True)])


HAPROXY_CONFIG = """\
global
    maxconn 200

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

# Accepts nothing: connected once HAProxy has bound every frontend.
frontend ready
    bind 127.0.0.1:{ready}
    tcp-request connection reject

frontend pop3_v1
    bind 127.0.0.1:{v1}
    default_backend pop3_v1
backend pop3_v1
    server pop3 127.0.0.1:{server} send-proxy

frontend pop3_v2
    bind 127.0.0.1:{v2}
    default_backend pop3_v2
backend pop3_v2
    server pop3 127.0.0.1:{server} send-proxy-v2

frontend pop3s_v1
    bind 127.0.0.1:{tls}
    default_backend pop3s_v1
backend pop3s_v1
    server pop3s 127.0.0.1:{tls_server} send-proxy
"""


class BehindHAProxy(ProxyTestCase):
    """A real HAProxy (mode tcp) on loopback in front of the server, trusting 127.0.0.0/8."""

    if HAPROXY is None:
        skip = "haproxy is not installed (apt-get install haproxy)"

    @defer.inlineCallbacks
    def start(self, **server: Any) -> Any:
        self.server(**server)
        server_port = yield self.listen()
        tls_server_port = yield self.listen("ssl:")
        self.ports = {"ready": free_port(), "v1": free_port(), "v2": free_port(), "tls": free_port(),
                      "server": server_port, "tls_server": tls_server_port}
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write(HAPROXY_CONFIG.format(**self.ports))
        log = open(config + ".log", "wb")
        self.addCleanup(log.close)
        haproxy = subprocess.Popen([HAPROXY, "-db", "-f", config], stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(self.stop_haproxy, haproxy)
        yield threads.deferToThread(self.wait_ready, haproxy, config + ".log")

    def wait_ready(self, haproxy: subprocess.Popen[bytes], log: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if haproxy.poll() is not None:
                with open(log, "rb") as f:
                    raise AssertionError("haproxy exited: %r" % (f.read(),))
            try:
                socket.create_connection(("127.0.0.1", self.ports["ready"]), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("haproxy did not start")

    def stop_haproxy(self, haproxy: subprocess.Popen[bytes]) -> None:
        haproxy.terminate()
        try:
            haproxy.wait(5)
        except subprocess.TimeoutExpired:
            haproxy.kill()
            haproxy.wait(5)

    def poplib_session(self, frontend: str) -> tuple[int, bytes]:
        c = POP3From("127.0.0.2", self.ports[frontend])
        c.user("alice")
        c.pass_("secret")
        count = c.stat()[0]
        body = b"\n".join(c.retr(1)[1])
        c.quit()
        return count, body

    @defer.inlineCallbacks
    def test_v1_and_v2_sessions_see_the_client(self) -> Any:
        yield self.start()
        for frontend in ("v1", "v2"):
            count, body = yield self.blocking(self.poplib_session, frontend)
            self.assertEqual(count, 1)
            self.assertIn(b"hello through the proxy", body)
        # The client's address as HAProxy saw it, not HAProxy's own 127.0.0.1.
        self.assertEqual(peers(self.events, "connect"), ["127.0.0.2", "127.0.0.2"])
        self.assertEqual(peers(self.events, "login"), ["127.0.0.2", "127.0.0.2"])

    def caps_and_failures(self) -> list[bytes]:
        out = []
        first = connect_from("127.0.0.2", self.ports["v1"])
        out.append(recv_line(first))
        second = connect_from("127.0.0.2", self.ports["v2"])  # the same client again: over the cap
        out.append(recv_line(second))
        self.assertEqual(read_all(second), b"")
        second.close()
        third = connect_from("127.0.0.3", self.ports["v2"])  # another client: admitted
        out.append(recv_line(third))
        for sock in (first, third, first):
            sock.sendall(b"USER alice\r\nPASS wrong\r\n")
            recv_line(sock)
            out.append(recv_line(sock))
        for sock in (first, third):
            sock.sendall(b"QUIT\r\n")
            recv_line(sock)
            sock.close()
        return out

    @defer.inlineCallbacks
    def test_caps_and_failure_delays_per_client(self) -> Any:
        # Loopback untrusted, so the per-address cap applies to 127.0.0.x.
        yield self.start(policy=Policy(failure_delay=0, allow_plaintext_auth=True, trust_loopback=False,
                                       max_connections_per_ip=1))
        out = yield self.blocking(self.caps_and_failures)
        self.assertTrue(out[0].startswith(b"+OK"))
        self.assertEqual(out[1], b"-ERR [SYS/TEMP] Too many connections from your address\r\n")
        self.assertTrue(out[2].startswith(b"+OK"))
        self.assertTrue(all(line.startswith(b"-ERR [AUTH]") for line in out[3:]), out)
        self.assertEqual([(f["peer"], f["ip_failures"]) for e, f in self.events if e == "login_failed"],
                         [("127.0.0.2", 1), ("127.0.0.3", 1), ("127.0.0.2", 2)])
        self.assertEqual([(f["peer"], f["why"]) for e, f in self.events if e == "refused"],
                         [("127.0.0.2", "Too many connections from your address")])

    def implicit_tls(self) -> tuple[int, str]:
        c = POP3SSLFrom("127.0.0.2", self.ports["tls"], self.context)
        c.user("alice")
        c.pass_("secret")
        count = c.stat()[0]
        version = c.sock.version()
        c.quit()
        return count, version

    def stls(self) -> int:
        c = POP3From("127.0.0.2", self.ports["v2"])
        c.stls(self.context)
        c.user("alice")
        c.pass_("secret")
        count = c.stat()[0]
        c.quit()
        return int(count)

    @defer.inlineCallbacks
    def test_implicit_tls_and_stls(self) -> Any:
        yield self.start()
        count, version = yield self.blocking(self.implicit_tls)
        self.assertEqual(count, 1)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual((yield self.blocking(self.stls)), 1)
        self.assertEqual([(f["peer"], f["tls"]) for e, f in self.events if e in ("connect", "login")],
                         [("127.0.0.2", True)] * 2 + [("127.0.0.2", False), ("127.0.0.2", True)])
        self.assertEqual(peers(self.events, "stls"), ["127.0.0.2"])
        self.assertEqual(peers(self.events, "tls_established"), ["127.0.0.2", "127.0.0.2"])

    def direct(self) -> tuple[bytes, bytes]:
        # HAProxy's own address, without a header, straight to the server: closed.
        with connect_from("127.0.0.1", self.ports["server"]) as raw:
            raw.sendall(b"CAPA\r\n")
            closed = read_all(raw)
        # Through HAProxy the same address is a client like any other.
        c = POP3From("127.0.0.1", self.ports["v1"])
        welcome = c.getwelcome()
        c.quit()
        return closed, welcome

    @defer.inlineCallbacks
    def test_direct_from_trusted_proxy_closed(self) -> Any:
        yield self.start()
        closed, welcome = yield self.blocking(self.direct)
        self.assertEqual(closed, b"")
        self.assertTrue(welcome.startswith(b"+OK"))
        self.assertEqual(peers(self.events, "connect"), ["127.0.0.1"])
