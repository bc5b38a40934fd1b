"""
A temporary POP3 world for the interoperability tests.

L{World} builds, under a fresh temporary directory::

    ROOT/passwd              Dovecot-style passwd-file ({PLAIN} passwords)
    ROOT/mail/<user>/        Maildirs (odd-numbered messages in new/, even ones
                             in cur/ with a ":2,S" info part)
    ROOT/tls/cert.pem, key.pem   self-signed, SAN localhost/127.0.0.1/::1
    ROOT/twistd.log          the server's log

and runs C{twistd -n pop3} on it as a subprocess listening on two free
loopback ports (plaintext+STLS, and implicit TLS).  Everything a test needs to
know about the expected wire bytes is computed here from the stored bytes:
L{Message.retr} (what RETR must yield once the dot-stuffing is undone),
L{Message.size} (what LIST/STAT must say), L{Message.top}.

Trial does not call C{setUpClass}, so test modules share a world through
L{shared_world}: started lazily on first use, stopped when a test from another
module asks for its own world (trial runs modules one after another) or at
interpreter exit.  Set C{POPSERVICE_INTEROP_KEEP=1} to keep the directories.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from popservice.tlsutil import make_self_signed

#: Seconds any single client operation may take before a test gives up.
TIMEOUT = 60.0

BASE_TS = 1700000000
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
#: the server command; C{POPSERVICE_INTEROP_TWISTD} may replace it (a shell-quoted command prefix)
TWISTD = os.path.join(VENV_BIN, "twistd")


# -- expected bytes -------------------------------------------------------------------------------


def crlf(data: bytes) -> bytes:
    """Normalise any mix of CRLF and bare LF line ends to CRLF (lone CRs stay)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def lf(data: bytes) -> bytes:
    """Normalise line ends to bare LF."""
    return data.replace(b"\r\n", b"\n")


def expected_retr(stored: bytes) -> bytes:
    """The bytes RETR yields for C{stored}, dot-stuffing undone, without the final C{.CRLF}."""
    out = crlf(stored)
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def transmitted_size(stored: bytes) -> int:
    """The size LIST/STAT report: CRLF octets, without the CRLF added to an unterminated last line."""
    return len(crlf(stored))


def expected_top(stored: bytes, lines: int) -> bytes:
    """TOP msg lines: the header, the blank line, then the first C{lines} body lines."""
    retr = expected_retr(stored)
    end = retr.find(b"\r\n\r\n")
    if end < 0:
        return retr
    header, body = retr[: end + 4], retr[end + 4 :]
    body_lines = body.split(b"\r\n")[:-1]
    return header + b"".join(line + b"\r\n" for line in body_lines[:lines])


def stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF body (as the server must put it on the wire)."""
    out = []
    for line in body.split(b"\r\n")[:-1]:
        out.append((b"." + line if line.startswith(b".") else line) + b"\r\n")
    return b"".join(out)


def unstuff_lines(lines: Iterable[bytes]) -> bytes:
    """Join multi-line response lines (each with its CRLF) undoing the dot-stuffing."""
    return b"".join(line[1:] if line.startswith(b".") else line for line in lines)


# -- messages -------------------------------------------------------------------------------------


def headers(user: str, idx: int, subject: bytes, extra: bytes = b"") -> bytes:
    return (
        b"Return-Path: <sender@example.org>\n"
        b"From: Sender <sender@example.org>\n"
        b"To: " + user.encode() + b"@example.org\n"
        b"Subject: " + subject + b"\n"
        b"Date: Tue, 14 Nov 2023 22:13:%02d +0000\n"
        % (idx % 60)
        + b"Message-ID: <"
        + user.encode()
        + b".%d@interop.popservice>\n" % idx
        + extra
    )


def awkward_messages(user: str) -> list[tuple[str, bytes]]:
    """(tag, stored bytes) for every awkward shape; line ends as stored on disk."""
    msgs: list[tuple[str, bytes]] = []
    body = b"".join(b"Body line %d of the first message.\n" % i for i in range(1, 7))
    msgs.append(("small", crlf(headers(user, 1, b"First small message") + b"\n" + body)))
    body = (
        b"Lines that need dot-stuffing follow.\n"
        b".leading dot\n..two leading dots\n.\n..\n...\n. space after dot\n"
        b"middle . dot\n.\n.end\nlast line\n"
    )
    msgs.append(("dots", crlf(headers(user, 2, b"Dot stuffing") + b"\n" + body)))
    body = (
        (
            "Gr\u00fc\u00dfe aus K\u00f6ln \u2013 na\u00efve caf\u00e9 r\u00e9sum\u00e9.\n"
            "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002\nEmoji: \U0001f600 \U0001f4e7\n"
        ).encode("utf-8")
        + bytes([0xA0, 0xFF, 0x80])
        + b" raw high bytes\n"
    )
    msgs.append(
        (
            "8bit",
            crlf(
                headers(
                    user,
                    3,
                    b"=?UTF-8?Q?Gr=C3=BC=C3=9Fe?=",
                    b"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
                    b"Content-Transfer-Encoding: 8bit\n",
                )
                + b"\n"
                + body
            ),
        )
    )
    body = b"Stored with bare LF line ends.\nSecond line.\n.dot line\n\nAfter an empty line.\n"
    msgs.append(("barelf", headers(user, 4, b"Bare LF storage") + b"\n" + body))
    lines = []
    total = n = 0
    while total < 1024 * 1024:
        n += 1
        if n % 97 == 0:
            line = b".dotted line %07d " % n + b"x" * 50 + b"\n"
        else:
            line = b"%07d " % n + hashlib.sha256(b"%d" % n).hexdigest().encode() + b"\n"
        lines.append(line)
        total += len(line) + 1
    msgs.append(("1mib", headers(user, 5, b"One mebibyte") + b"\n" + b"".join(lines)))
    longval = b" ".join(b"token%04d" % i for i in range(1000))
    folded = b"\n\t".join(b"<ref%03d@interop.popservice>" % i for i in range(60))
    msgs.append(
        (
            "longheader",
            crlf(
                headers(
                    user,
                    6,
                    b"Very long header",
                    b"X-Long-Header: " + longval + b"\nReferences: " + folded + b"\n",
                )
                + b"\nShort body after a long header.\n"
            ),
        )
    )
    msgs.append(
        ("notrail", crlf(headers(user, 7, b"No trailing newline") + b"\nThe last line has no newline"))
    )
    msgs.append(
        ("tiny", b"Subject: tiny\r\nMessage-ID: <%s.8@interop.popservice>\r\n\r\nx\r\n" % user.encode())
    )
    msgs.append(("emptybody", crlf(headers(user, 9, b"Empty body") + b"\n")))
    msgs.append(
        (
            "mixed",
            headers(user, 10, b"Mixed line ends") + b"\r\nCRLF line\r\nLF line\n.dot LF\n.dot CRLF\r\nlast\n",
        )
    )
    msgs.append(("dotnotrail", crlf(headers(user, 11, b"Ends in a dot") + b"\nnext line is a lone dot\n.")))
    return msgs


def simple_messages(user: str, count: int, eol: bytes = b"\n") -> list[tuple[str, bytes]]:
    out = []
    for i in range(1, count + 1):
        body = b"".join(b"Message %d for %s, line %d.\n" % (i, user.encode(), j) for j in range(1, 4 + i))
        msg = headers(user, i, b"Message %d for %s" % (i, user.encode())) + b"\n" + body
        out.append(("simple", msg.replace(b"\n", eol)))
    return out


def huge_message(user: str, size: int = 50 * 1024 * 1024) -> bytes:
    """About C{size} bytes, LF line ends, dotted lines sprinkled in, every 64 KiB block distinct."""
    line_block = []
    for j in range(1, 900):
        if j % 31 == 0:
            line_block.append(b".." + b"d" * 68 + b"\n")
        else:
            line_block.append(b"%04d " % j + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\n")
    block = b"".join(line_block)
    head = headers(user, 1, b"Fifty mebibytes") + b"\n"
    parts = [head]
    total = len(head)
    i = 0
    while total < size:
        i += 1
        part = b"block %08d\n" % i + block
        parts.append(part)
        total += len(part)
    return b"".join(parts)


@dataclass
class Message:
    user: str
    number: int
    tag: str
    stored: bytes
    base: str
    rel: str

    @property
    def retr(self) -> bytes:
        return expected_retr(self.stored)

    @property
    def size(self) -> int:
        return transmitted_size(self.stored)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.retr).hexdigest()

    def top(self, lines: int) -> bytes:
        return expected_top(self.stored, lines)


@dataclass
class User:
    name: str
    password: str
    messages: list[Message] = field(default_factory=list)


# -- raw client -----------------------------------------------------------------------------------


class RawPOP:
    """A minimal blocking POP3 client on a raw socket: exact bytes, no line limits."""

    def __init__(
        self, port: int, *, implicit_tls: bool = False, cafile: str | None = None, timeout: float = TIMEOUT
    ) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if implicit_tls:
            self.sock = client_context(cafile).wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""
        self.greeting = self.line()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("server closed the connection; buffer=%r" % (self.buf[:200],))
        self.buf += data

    def line(self) -> bytes:
        """One line without its CRLF."""
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2 :]
                return line
            self._fill()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.line()

    def multi_body(self) -> bytes:
        """The rest of a multi-line response after its status line, stuffing undone."""
        end = self.buf.find(b"\r\n.\r\n")
        if self.buf.startswith(b".\r\n"):
            self.buf = self.buf[3:]
            return b""
        while end < 0:
            start = max(0, len(self.buf) - 4)
            self._fill()
            if self.buf.startswith(b".\r\n"):
                self.buf = self.buf[3:]
                return b""
            end = self.buf.find(b"\r\n.\r\n", start)
        wire, self.buf = self.buf[: end + 2], self.buf[end + 5 :]
        return unstuff_lines(wire.splitlines(keepends=True))

    def multi(self, line: bytes) -> tuple[bytes, bytes]:
        status = self.command(line)
        if not status.startswith(b"+OK"):
            return status, b""
        return status, self.multi_body()

    def login(self, user: str, password: str) -> bytes:
        r = self.command(b"USER " + user.encode())
        if not r.startswith(b"+OK"):
            return r
        return self.command(b"PASS " + password.encode())

    def stls(self, cafile: str | None) -> bytes:
        r = self.command(b"STLS")
        if r.startswith(b"+OK"):
            assert not self.buf, "data after STLS +OK: %r" % (self.buf,)
            self.sock = client_context(cafile).wrap_socket(self.sock, server_hostname="localhost")
        return r

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def quit(self) -> bytes:
        try:
            return self.command(b"QUIT")
        finally:
            self.close()


def client_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the world ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class World:
    """Maildirs, passwd-file, certificate and a running C{twistd pop3} on loopback."""

    def __init__(self, name: str, extra_args: Iterable[str] = ()) -> None:
        self.name = name
        self.root = tempfile.mkdtemp(prefix="popservice-interop-%s-" % name)
        os.chmod(self.root, 0o755)  # getmail runs as nobody and must traverse it
        self.mail = os.path.join(self.root, "mail")
        os.makedirs(self.mail)
        self.passwd = os.path.join(self.root, "passwd")
        tls = os.path.join(self.root, "tls")
        os.makedirs(tls)
        make_self_signed(tls, hostname="localhost")
        self.cert = os.path.join(tls, "cert.pem")
        self.key = os.path.join(tls, "key.pem")
        os.chmod(self.cert, 0o644)
        self.log = os.path.join(self.root, "twistd.log")
        self.users: dict[str, User] = {}
        self.extra_passwd: list[str] = []
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = self.tls_port = 0

    def untrusted_cert(self) -> str:
        """A different self-signed certificate for localhost: trusting it must not verify the server."""
        d = os.path.join(self.root, "other-tls")
        if not os.path.exists(os.path.join(d, "cert.pem")):
            make_self_signed(d, hostname="localhost")
            os.chmod(d, 0o755)
            os.chmod(os.path.join(d, "cert.pem"), 0o644)
        return os.path.join(d, "cert.pem")

    # building

    def add_user(self, name: str, password: str, messages: Iterable[tuple[str, bytes]] = ()) -> User:
        user = User(name, password)
        self.users[name] = user
        d = os.path.join(self.mail, name)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        for i, (tag, stored) in enumerate(messages, start=1):
            ts = BASE_TS + 60 * i
            base = "%d.M%06dP4242Q%d.interop" % (ts, i, i)
            rel = os.path.join("new", base) if i % 2 else os.path.join("cur", base + ":2,S")
            path = os.path.join(d, rel)
            with open(path, "wb") as f:
                f.write(stored)
            os.utime(path, (ts, ts))
            user.messages.append(Message(name, i, tag, stored, base, rel))
        self._write_passwd()
        return user

    def add_standard_users(self) -> None:
        """alice: every awkward shape (read-only use); bob: empty; carol: 3 simple LF messages."""
        self.add_user("alice", "alicepw", awkward_messages("alice"))
        self.add_user("bob", "bobpw", [])
        self.add_user("carol", "carolpw", simple_messages("carol", 3))

    def add_passwd_line(self, line: str) -> None:
        """An extra raw passwd-file line (for accounts with hostile names and no Maildir of their own)."""
        self.extra_passwd.append(line)
        self._write_passwd()

    def _write_passwd(self) -> None:
        with open(self.passwd, "w") as f:
            for u in self.users.values():
                f.write("%s:{PLAIN}%s:::::\n" % (u.name, u.password))
            for line in self.extra_passwd:
                f.write(line + "\n")
        os.chmod(self.passwd, 0o644)

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def logins(self, method: str) -> int:
        """How many successful logins by C{method} (USER, APOP, ...) the server has logged."""
        tag = " method=%s " % method
        return sum(1 for line in self.log_text().splitlines() if "pop3 login:" in line and tag in line)

    # inspecting

    def maildir(self, user: str) -> str:
        return os.path.join(self.mail, user)

    def files(self, user: str) -> dict[str, str]:
        """Base name -> path of every message file in new/ and cur/."""
        out = {}
        for sub in ("new", "cur"):
            d = os.path.join(self.mail, user, sub)
            for fn in os.listdir(d):
                out[fn.split(":", 1)[0]] = os.path.join(d, fn)
        return out

    def present(self, user: str) -> list[int]:
        """Numbers of the user's messages still in the Maildir."""
        bases = self.files(user)
        return [m.number for m in self.users[user].messages if m.base in bases]

    # running

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_kib(self) -> int:
        """The server's resident set size (VmRSS) in KiB."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS for %d" % self.pid)

    def command_line(self) -> list[str]:
        override = os.environ.get("POPSERVICE_INTEROP_TWISTD")
        twistd = shlex.split(override) if override else [TWISTD]
        return [
            *twistd,
            "-n",
            "--pidfile=",
            "-l",
            self.log,
            "pop3",
            "--mail",
            "maildir:%s/%%u" % self.mail,
            "--auth",
            "passwd-file:%s" % self.passwd,
            "--listen",
            "tcp:%d:interface=127.0.0.1" % self.port,
            "--listen",
            "ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1" % (self.tls_port, self.key, self.cert),
            "--tls-certificate",
            self.cert,
            "--tls-key",
            self.key,
            "--failure-delay",
            "0",
            "--hostname",
            "localhost",
        ] + self.extra_args

    def start(self) -> None:
        last_error: Exception | None = None
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port, self.tls_port = free_port(), free_port()
            if self.port == self.tls_port:
                continue
            with open(os.path.join(self.root, "twistd.out"), "wb") as out:  # the child keeps its copy
                self.process = subprocess.Popen(
                    self.command_line(),
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                self._wait_ready()
                return
            except Exception as e:  # noqa: BLE001
                last_error = e
                self.stop_process()
        raise RuntimeError("twistd pop3 did not start: %s\n--- log ---\n%s" % (last_error, self.log_tail()))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            if not self.alive():
                raise RuntimeError(
                    "server exited with %s" % (self.process.returncode if self.process else None)
                )
            try:
                c = RawPOP(self.port, timeout=5)
                ok = c.greeting.startswith(b"+OK")
                c.close()
                t = RawPOP(self.tls_port, implicit_tls=True, cafile=self.cert, timeout=5)
                ok = ok and t.greeting.startswith(b"+OK")
                t.close()
                if ok:
                    return
            except (OSError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not accepting after 30 s")
            time.sleep(0.05)

    def log_tail(self, n: int = 40) -> str:
        text = ""
        for name in ("twistd.out", "twistd.log"):
            p = os.path.join(self.root, name)
            if os.path.exists(p):
                with open(p, errors="replace") as f:
                    text += "".join(f.readlines()[-n:])
        return text

    def stop_process(self) -> None:
        p, self.process = self.process, None
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if p.stdout:
            p.stdout.close()

    def stop(self) -> None:
        self.stop_process()
        if not os.environ.get("POPSERVICE_INTEROP_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)

    # raw sessions

    def connect(self, *, tls: bool = False) -> RawPOP:
        if tls:
            return RawPOP(self.tls_port, implicit_tls=True, cafile=self.cert)
        return RawPOP(self.port)

    def session(self, user: str, *, tls: bool = False, wait_in_use: float = 5.0) -> RawPOP:
        """
        A logged-in raw session.  A mailbox still locked by a session that was
        just dropped is retried for up to C{wait_in_use} seconds.
        """
        deadline = time.monotonic() + wait_in_use
        while True:
            c = self.connect(tls=tls)
            r = c.login(user, self.users[user].password)
            if r.startswith(b"+OK"):
                return c
            c.close()
            if not r.startswith(b"-ERR [IN-USE]") or time.monotonic() > deadline:
                raise AssertionError("login as %s failed: %r" % (user, r))
            time.sleep(0.05)


class RssSampler:
    """Samples a process's VmRSS every C{interval} seconds in a thread."""

    def __init__(self, world: World, interval: float = 0.02) -> None:
        self.world = world
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.world.rss_kib())
            except Exception:  # noqa: BLE001 - the server went away; stop sampling
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.samples.append(self.world.rss_kib())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self.world.alive():
            self.samples.append(self.world.rss_kib())

    @property
    def baseline(self) -> int:
        return self.samples[0]

    @property
    def peak(self) -> int:
        return max(self.samples)

    @property
    def growth_kib(self) -> int:
        return self.peak - self.baseline


# -- one world per test module --------------------------------------------------------------------

_current: dict[str, World] = {}


def shared_world(key: str, build: Callable[[World], None], extra_args: Iterable[str] = (),
                 world_class: Callable[..., World] = World) -> World:
    """
    The running world for C{key} (usually the test module's name), built with
    C{build} and started on first use.  A world for another key is stopped
    first, so at most one server runs at a time.
    """
    world = _current.get(key)
    if world is not None and world.alive():
        return world
    for other in list(_current):
        _current.pop(other).stop()
    world = world_class(key.rsplit(".", 1)[-1], extra_args)
    try:
        build(world)
        world.start()
    except BaseException:
        world.stop()
        raise
    _current[key] = world
    return world


@atexit.register
def _stop_all() -> None:
    for key in list(_current):
        _current.pop(key).stop()


def run(
    argv: list[str],
    *,
    timeout: float = TIMEOUT,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a client program; output captured; never raises on a non-zero exit."""
    return subprocess.run(
        argv,
        input=input,
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
