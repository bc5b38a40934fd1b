"""
Soak (issue "Reliability", item 8): mixed load against a real C{twistd pop3}
with a ledger of every message, and the server's memory watched.

L{Soak} runs, for a fixed time, against one server over Maildirs that also
serves LMTP:

 - POP3 clients (threads), each session for a random user: UIDL, TOP 0 of
   every message not seen before (to learn its Message-ID), RETR of a few
   (their bytes checked against the digest the message carries), DELE of
   some and QUIT; or a random disconnect: right after login, after the DELEs
   (nothing may be removed), or in the middle of a large RETR (RST);
 - deliveries: over LMTP (one connection per thread, reused) and through
   C{popservice deliver} subprocesses, concurrently with the sessions; now
   and then an LMTP transaction is dropped in the middle of its data (that
   message must never appear);
 - a sampler reading the server's VmRSS from C{/proc/PID/status} every second.

The ledger records each message delivered (LMTP 250, exit status 0) and each
message removed (DELE'd in a session whose QUIT got C{+OK}).  At the end the
Maildirs must hold exactly delivered - removed, by Message-ID (no duplicate,
no aborted message), every UIDL seen must still name the same message, and
the index must match the disk.  The RSS is "flat" when its value at the end
of the load is within L{Soak.flat_kib} of its value after the warm-up.

C{bench/soak.py --minutes 30} runs it on demand; L{SoakTests} runs 60 seconds.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import random
import smtplib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.trial import unittest

from tests.interop.test_faults import PipedWorld, disk_bases, index_problems, message_id, read_index
from tests.interop.world import VENV_BIN, RawPOP, free_port

MIB = 1024 * 1024
POPSERVICE = os.path.join(VENV_BIN, "popservice")
#: seconds any one client operation may take
OP_TIMEOUT = 30.0


class SoakWorld(PipedWorld):
    """The world of L{Soak}: users C{soak0..N}, empty Maildirs, LMTP on another loopback port."""

    def __init__(self, users: int) -> None:
        super().__init__("soak")
        self.lmtp_port = 0
        for i in range(users):
            self.add_user("soak%d" % i, "soakpw%d" % i, [])

    def command_line(self) -> list[str]:
        return super().command_line() + ["--lmtp", "tcp:%d:interface=127.0.0.1" % self.lmtp_port]

    def start(self) -> None:
        self.lmtp_port = free_port()
        super().start()


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def make_message(rng: random.Random, user: str, seq: int) -> tuple[str, bytes]:
    """(Message-ID, message with LF line ends); the body's SHA-256 is in C{X-Soak-Digest}."""
    r = rng.random()
    size = rng.randint(200, 8 * 1024) if r < 0.8 else (
        rng.randint(8 * 1024, 100 * 1024) if r < 0.98 else rng.randint(512 * 1024, 2 * MIB))
    lines = []
    total = 0
    n = 0
    seed = b"%d.%s" % (seq, user.encode())
    while total < size:
        n += 1
        if n % 41 == 0:
            line = b".dot-stuffed line %d\n" % n
        elif n % 53 == 0:
            line = b".\n"
        else:
            line = b"%06d " % n + hashlib.sha256(seed + b"%d" % n).hexdigest().encode() + b"\n"
        lines.append(line)
        total += len(line)
    body = b"".join(lines)
    mid = "<soak.%d.%s@soak.popservice>" % (seq, user)
    head = (b"From: load <load@example.org>\nTo: %s@example.org\nSubject: soak %d\n"
            b"Message-ID: %s\nX-Soak-Digest: %s\n"
            % (user.encode(), seq, mid.encode(), hashlib.sha256(body).hexdigest().encode()))
    return mid, head + b"\n" + body


def digest_ok(retrieved: bytes) -> bool:
    """Does a retrieved message (CRLF, stuffing undone) match the digest it carries?"""
    data = lf(retrieved)
    head, sep, body = data.partition(b"\n\n")
    if not sep:
        return False
    for line in head.split(b"\n"):
        if line.lower().startswith(b"x-soak-digest:"):
            return hashlib.sha256(body).hexdigest().encode() == line.split(b":", 1)[1].strip()
    return False


@dataclass
class SoakStats:
    sessions: int = 0
    in_use: int = 0
    retrs: int = 0
    retr_bytes: int = 0
    tops: int = 0
    quits: int = 0
    removals: int = 0  # messages removed by QUITs that got +OK
    disconnects: collections.Counter[str] = field(default_factory=collections.Counter)
    deliveries_lmtp: int = 0
    deliveries_cli: int = 0
    aborted_lmtp: int = 0
    delivery_failures: int = 0
    errors: list[str] = field(default_factory=list)
    #: (seconds since start, VmRSS KiB)
    rss: list[tuple[float, int]] = field(default_factory=list)
    #: (seconds since start, open file descriptors of the server)
    fds: list[tuple[float, int]] = field(default_factory=list)


class Ledger:
    """Every message delivered and every message removed; UIDLs as seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.delivered: dict[str, str] = {}  # Message-ID -> user
        self.removed: set[str] = set()
        self.aborted: set[str] = set()
        self.uncertain_delivered: dict[str, str] = {}
        self.uncertain_removed: set[str] = set()
        self.uidl_to_mid: dict[tuple[str, str], str] = {}
        self.mid_to_uidl: dict[str, str] = {}
        self._live: collections.Counter[str] = collections.Counter()

    def add_delivered(self, mid: str, user: str) -> None:
        with self.lock:
            self.delivered[mid] = user
            self._live[user] += 1

    def add_removed(self, mids: list[str], user: str) -> None:
        with self.lock:
            self.removed.update(mids)
            self._live[user] -= len(mids)

    def live_count(self, user: str) -> int:
        """Delivered and not removed (an estimate for pacing deliveries)."""
        with self.lock:
            return self._live[user]


class Soak:
    """
    The soak run (see the module docstring).  L{run} returns the stats;
    L{verify} compares ledger and disk and returns the problems found.
    """

    def __init__(self, *, seconds: float, users: int = 8, clients: int = 6, lmtp_threads: int = 2,
                 cli_threads: int = 1, target: int = 60, seed: int = 1, warmup: float | None = None,
                 flat_kib: int = 5 * 1024, log: Callable[[str], None] = print,
                 progress_every: float = 60, fixed_mmap_threshold: bool = False) -> None:
        self.seconds = seconds
        self.users = ["soak%d" % i for i in range(users)]
        self.clients = clients
        self.lmtp_threads = lmtp_threads
        self.cli_threads = cli_threads
        self.target = target
        self.seed = seed
        # glibc keeps freed multi-MiB blocks once its mmap threshold went up: with the default allocator
        # the RSS climbs to a plateau over some ten minutes of this load (fixed_mmap_threshold: at once)
        self.warmup = warmup if warmup is not None else max(15.0, min(600.0, seconds / 3))
        self.flat_kib = flat_kib
        self.log = log
        self.progress_every = progress_every
        self.world = SoakWorld(users)
        if fixed_mmap_threshold:
            # glibc raises its mmap threshold after a large block is freed, so later multi-MiB
            # messages come from (and stay in) the heaps of the reactor and pool threads: the RSS
            # climbs to a plateau over minutes.  A fixed threshold returns them at once.
            self.world.server_env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        self.fixed_mmap_threshold = fixed_mmap_threshold
        self.ledger = Ledger()
        self.stats = SoakStats()
        self._stop = threading.Event()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.started = 0.0

    # bookkeeping

    def next_seq(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def error(self, what: str) -> None:
        with self._stats_lock:
            if len(self.stats.errors) < 200:
                self.stats.errors.append("%.1f s: %s" % (time.monotonic() - self.started, what))
        self.log("  ! " + what)

    def password(self, user: str) -> str:
        return self.world.users[user].password

    # deliveries

    def pick_recipient(self, rng: random.Random) -> str:
        users = [u for u in self.users if self.ledger.live_count(u) < 2 * self.target]
        return rng.choice(users or self.users)

    def lmtp_worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + 100 + index)
        client: smtplib.LMTP | None = None
        while not self._stop.is_set():
            user = self.pick_recipient(rng)
            mid, message = make_message(rng, user, self.next_seq())
            if rng.random() < 0.02:
                self.lmtp_abort(user, mid, message)
                continue
            try:
                if client is None:
                    client = smtplib.LMTP("127.0.0.1", self.world.lmtp_port, timeout=OP_TIMEOUT)
                    client.ehlo_or_helo_if_needed()
                # (bytes go out as they are: CRLF line ends, or smtplib's dot-stuffing would not match)
                refused = client.sendmail("load@example.org", ["%s@example.org" % user],
                                          message.replace(b"\n", b"\r\n"))
                if refused:
                    self.error("LMTP refused %s: %r" % (mid, refused))
                    self.count("delivery_failures")
                else:
                    self.ledger.add_delivered(mid, user)
                    self.count("deliveries_lmtp")
            except smtplib.SMTPResponseException as e:
                self.error("LMTP %s: %s %r" % (mid, e.smtp_code, e.smtp_error))
                self.count("delivery_failures")
            except (OSError, smtplib.SMTPException) as e:
                with self.ledger.lock:
                    self.ledger.uncertain_delivered[mid] = user
                self.error("LMTP connection trouble delivering %s: %r" % (mid, e))
                with contextlib.suppress(Exception):
                    client.close()  # type: ignore[union-attr]
                client = None
            if client is not None and rng.random() < 0.02:  # a fresh connection now and then
                with contextlib.suppress(Exception):
                    client.quit()
                client = None
            self._stop.wait(rng.uniform(0, 0.05))
        if client is not None:
            with contextlib.suppress(Exception):
                client.quit()

    def lmtp_abort(self, user: str, mid: str, message: bytes) -> None:
        """An LMTP transaction dropped in the middle of its data: the message must never be stored."""
        with self.ledger.lock:
            self.ledger.aborted.add(mid)
        try:
            with socket.create_connection(("127.0.0.1", self.world.lmtp_port), timeout=OP_TIMEOUT) as s:
                f = s.makefile("rb")
                f.readline()
                s.sendall(b"LHLO soak\r\n")
                while f.readline()[3:4] == b"-":
                    pass
                for line in (b"MAIL FROM:<load@example.org>", b"RCPT TO:<%s@example.org>" % user.encode(),
                             b"DATA"):
                    s.sendall(line + b"\r\n")
                    f.readline()
                data = b"".join(b"." + line if line.startswith(b".") else line
                                for line in message.replace(b"\n", b"\r\n").splitlines(keepends=True))
                s.sendall(data[: max(1, len(data) // 2)])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.count("aborted_lmtp")
        except OSError as e:
            self.error("aborting an LMTP transaction: %r" % (e,))

    def cli_worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + 200 + index)
        while not self._stop.is_set():
            user = self.pick_recipient(rng)
            mid, message = make_message(rng, user, self.next_seq())
            try:
                argv = [POPSERVICE, "deliver", user, "--mail", "maildir:%s/%%u" % self.world.mail]
                r = subprocess.run(argv, input=message, capture_output=True, timeout=OP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with self.ledger.lock:
                    self.ledger.uncertain_delivered[mid] = user
                self.error("popservice deliver timed out")
                continue
            if r.returncode == 0:
                self.ledger.add_delivered(mid, user)
                self.count("deliveries_cli")
            else:
                self.error("popservice deliver exited %d: %r" % (r.returncode, r.stderr[-300:]))
                self.count("delivery_failures")

    # sessions

    def client_worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while not self._stop.is_set():
            user = rng.choice(self.users)
            c: RawPOP | None = None
            try:
                c = RawPOP(self.world.port, timeout=OP_TIMEOUT)
                r = c.login(user, self.password(user))
                if r.startswith(b"-ERR [IN-USE]"):
                    self.count("in_use")
                    c.quit()
                    self._stop.wait(rng.uniform(0, 0.05))
                    continue
                if not r.startswith(b"+OK"):
                    self.error("login of %s: %r" % (user, r))
                    continue
                self.count("sessions")
                self.session(c, user, rng)
            except (OSError, ConnectionError, AssertionError, ValueError) as e:
                self.error("session of %s: %r" % (user, e))
            finally:
                if c is not None:
                    c.close()

    def learn(self, c: RawPOP, user: str) -> dict[int, str]:
        """Number -> Message-ID of the listing (TOP 0 for UIDLs not seen before); checks UIDL stability."""
        status, body = c.multi(b"UIDL")
        if not status.startswith(b"+OK"):
            raise AssertionError("UIDL: %r" % (status,))
        listing = {int(n): u for n, u in (line.split() for line in body.decode("ascii").splitlines())}
        out: dict[int, str] = {}
        unknown = []
        with self.ledger.lock:
            for n, u in listing.items():
                mid = self.ledger.uidl_to_mid.get((user, u))
                if mid is None:
                    unknown.append(n)
                else:
                    out[n] = mid
        for n in unknown:
            status, head = c.multi(b"TOP %d 0" % n)
            self.count("tops")
            if not status.startswith(b"+OK"):
                self.error("TOP %d of %s: %r" % (n, user, status))
                continue
            mid = message_id(head)
            if mid is None:
                self.error("no Message-ID in message %d of %s" % (n, user))
                continue
            out[n] = mid
            with self.ledger.lock:
                seen = self.ledger.mid_to_uidl.setdefault(mid, listing[n])
                known = self.ledger.uidl_to_mid.setdefault((user, listing[n]), mid)
            if seen != listing[n]:
                self.error("UIDL of %s changed: %s -> %s" % (mid, seen, listing[n]))
            if known != mid:
                self.error("UIDL %s of %s named %s, now %s" % (listing[n], user, known, mid))
        return out

    def retr(self, c: RawPOP, user: str, n: int) -> None:
        status, body = c.multi(b"RETR %d" % n)
        if not status.startswith(b"+OK"):
            self.error("RETR %d of %s: %r" % (n, user, status))
            return
        self.count("retrs")
        self.count("retr_bytes", len(body))
        if not digest_ok(body):
            self.error("RETR %d of %s: content does not match its digest" % (n, user))

    def session(self, c: RawPOP, user: str, rng: random.Random) -> None:
        mids = self.learn(c, user)
        numbers = sorted(mids)
        r = rng.random()
        if r < 0.05:
            self.disconnect(c, "after login", rng)
            return
        for n in rng.sample(numbers, min(len(numbers), rng.randint(0, 4))):
            self.retr(c, user, n)
        # the mailbox is kept between half the target and the target (deliveries pause at twice it)
        if len(numbers) > self.target:
            k = len(numbers) - self.target + rng.randint(0, 3)
        elif len(numbers) > self.target // 2 and rng.random() < 0.2:
            k = rng.randint(1, 3)
        else:
            k = 0
        doomed = rng.sample(numbers, k)
        if doomed:
            c.send(b"".join(b"DELE %d\r\n" % n for n in doomed))
            for n in doomed:
                answer = c.line()
                if not answer.startswith(b"+OK"):
                    self.error("DELE %d of %s: %r" % (n, user, answer))
        if r < 0.12:
            self.disconnect(c, "after DELE", rng)  # nothing may be removed
            return
        if r < 0.17 and numbers:
            c.send(b"RETR %d\r\n" % rng.choice(numbers))
            with contextlib.suppress(OSError):
                c.sock.recv(rng.randint(1, 1 << 16))
            self.disconnect(c, "mid-RETR", rng, rst=True)
            return
        try:
            answer = c.command(b"QUIT")
        except (OSError, ConnectionError) as e:
            with self.ledger.lock:
                self.ledger.uncertain_removed.update(mids[n] for n in doomed)
            self.error("QUIT of %s: %r" % (user, e))
            return
        self.count("quits")
        if answer.startswith(b"+OK"):
            self.ledger.add_removed([mids[n] for n in doomed], user)
            self.count("removals", len(doomed))
        else:
            with self.ledger.lock:
                self.ledger.uncertain_removed.update(mids[n] for n in doomed)
            self.error("QUIT of %s: %r" % (user, answer))

    def disconnect(self, c: RawPOP, when: str, rng: random.Random, rst: bool | None = None) -> None:
        if rst or (rst is None and rng.random() < 0.5):
            with contextlib.suppress(OSError):
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            when += " (RST)"
        c.close()
        with self._stats_lock:
            self.stats.disconnects[when] += 1

    # memory

    def sampler(self) -> None:
        pid = self.world.pid
        next_progress = self.progress_every
        while True:
            t = time.monotonic() - self.started
            try:
                with open("/proc/%d/status" % pid) as f:
                    kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                self.error("server process gone")
                return
            self.stats.rss.append((t, kib))
            with contextlib.suppress(OSError):
                self.stats.fds.append((t, len(os.listdir("/proc/%d/fd" % pid))))
            if self.progress_every and t >= next_progress:
                next_progress += self.progress_every
                s = self.stats
                self.log("%4.0f s: %d sessions, %d deliveries, %d removals, RSS %.1f MiB, %d fds, errors %d"
                         % (t, s.sessions, s.deliveries_lmtp + s.deliveries_cli, s.removals, kib / 1024,
                            s.fds[-1][1] if s.fds else -1, len(s.errors)))
            if self._stop.wait(1.0):
                return

    def rss_figures(self) -> dict[str, float]:
        """start, after warm-up, max, end of the load (MiB)."""
        samples = self.stats.rss
        if not samples:
            return {}
        warm = next((kib for t, kib in samples if t >= self.warmup), samples[-1][1])
        return {"start": samples[0][1] / 1024, "warm": warm / 1024, "max": max(k for _, k in samples) / 1024,
                "end": samples[-1][1] / 1024}

    def rss_flat(self) -> bool:
        figures = self.rss_figures()
        return bool(figures) and (figures["end"] - figures["warm"]) * 1024 <= self.flat_kib

    # the run

    def run(self) -> SoakStats:
        self.world.start()
        self.started = time.monotonic()
        threads = [threading.Thread(target=self.sampler, name="rss", daemon=True)]
        threads += [threading.Thread(target=self.client_worker, args=(i,), daemon=True)
                    for i in range(self.clients)]
        threads += [threading.Thread(target=self.lmtp_worker, args=(i,), daemon=True)
                    for i in range(self.lmtp_threads)]
        threads += [threading.Thread(target=self.cli_worker, args=(i,), daemon=True)
                    for i in range(self.cli_threads)]
        for t in threads:
            t.start()
        self._stop.wait(self.seconds)
        self._stop.set()
        deadline = time.monotonic() + 2 * OP_TIMEOUT
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            self.error("threads still running after the stop: %s" % stuck)
        self.elapsed = time.monotonic() - self.started
        return self.stats

    def verify(self) -> list[str]:
        """Ledger against disk and against a last login per user; the problems found."""
        problems: list[str] = []
        ledger = self.ledger
        self.resolved_delivered = self.resolved_removed = 0
        self.present_total = 0
        never = ledger.removed - set(ledger.delivered) - set(ledger.uncertain_delivered)
        if never:
            problems.append("%d messages removed that were never delivered: %s"
                            % (len(never), sorted(never)[:3]))
        shown_aborted = ledger.aborted & set(ledger.mid_to_uidl)
        if shown_aborted:
            problems.append("%d aborted LMTP messages listed by a session: %s"
                            % (len(shown_aborted), sorted(shown_aborted)[:3]))
        for user in self.users:
            maildir = self.world.maildir(user)
            files = disk_bases(maildir)
            on_disk: collections.Counter[str] = collections.Counter()
            mid_of_base: dict[str, str] = {}
            for base, rel in files.items():
                with open(os.path.join(maildir, rel), "rb") as f:
                    mid = message_id(f.read(8192)) or "?"
                on_disk[mid] += 1
                mid_of_base[base] = mid
            self.present_total += len(files)
            dup = [m for m, k in on_disk.items() if k > 1]
            if dup:
                problems.append("%s: %d messages stored twice, e.g. %s" % (user, len(dup), dup[0]))
            present = set(on_disk)
            expected = {m for m, u in ledger.delivered.items() if u == user} - ledger.removed
            for m, u in ledger.uncertain_delivered.items():
                if u == user and m in present:
                    expected.add(m)
                    self.resolved_delivered += 1
            for m in ledger.uncertain_removed & expected:
                if m not in present:
                    expected.discard(m)
                    self.resolved_removed += 1
            missing = expected - present
            extra = present - expected
            if missing:
                problems.append("%s: %d delivered, not removed, not there: %s"
                                % (user, len(missing), sorted(missing)[:3]))
            if extra:
                problems.append("%s: %d there that the ledger says removed or never delivered: %s"
                                % (user, len(extra), sorted(extra)[:3]))
            aborted = ledger.aborted & present
            if aborted:
                problems.append("%s: %d aborted LMTP messages stored" % (user, len(aborted)))
            c = self.world.session(user, wait_in_use=10)
            try:
                status = c.command(b"STAT")
                listed = int(status.split()[1]) if status.startswith(b"+OK") else -1
                c.quit()
            finally:
                c.close()
            if listed != len(files):
                problems.append("%s: STAT says %d, %d files" % (user, listed, len(files)))
            index, _ = read_index(maildir)
            problems += ["%s: %s" % (user, p) for p in index_problems(index, files)]
            if index is not None:
                for base, (uidl, _) in index.entries.items():
                    named = mid_of_base.get(base, "")
                    seen = ledger.mid_to_uidl.get(named)
                    if seen is not None and seen != uidl:
                        problems.append("%s: UIDL of %s changed: %s -> %s" % (user, named, seen, uidl))
        return problems

    def report(self, problems: list[str]) -> str:
        s = self.stats
        rss = self.rss_figures()
        delivered = len(self.ledger.delivered)
        lines = [
            "load %.0f s, %d users, %d POP3 clients, %d LMTP + %d popservice-deliver threads"
            % (self.elapsed, len(self.users), self.clients, self.lmtp_threads, self.cli_threads),
            "sessions %d (%d QUIT, %d refused [IN-USE]); RETR %d (%.1f MiB), TOP %d"
            % (s.sessions, s.quits, s.in_use, s.retrs, s.retr_bytes / MIB, s.tops),
            "random disconnects %d (%s)" % (sum(s.disconnects.values()),
                                             ", ".join("%s %d" % kv for kv in sorted(s.disconnects.items()))),
            "deliveries %d (LMTP %d, popservice deliver %d), LMTP aborted mid-data %d, failed %d"
            % (s.deliveries_lmtp + s.deliveries_cli, s.deliveries_lmtp, s.deliveries_cli, s.aborted_lmtp,
               s.delivery_failures),
            "removals %d (by QUITs answered +OK)" % s.removals,
            "ledger: delivered %d - removed %d = %d, present %d: %s"
            % (delivered, len(self.ledger.removed), delivered - len(self.ledger.removed), self.present_total,
               "agree exactly" if not problems else "DISAGREE"),
            "uncertain outcomes: deliveries %d (%d found), removals %d (%d gone)"
            % (len(self.ledger.uncertain_delivered), self.resolved_delivered,
               len(self.ledger.uncertain_removed), self.resolved_removed),
        ]
        if rss:
            lines.append("server RSS MiB: start %.1f, after %.0f s warm-up %.1f, max %.1f, end %.1f: %s%s"
                         % (rss["start"], self.warmup, rss["warm"], rss["max"], rss["end"],
                            "flat" if self.rss_flat() else "GREW by %.1f" % (rss["end"] - rss["warm"]),
                            " (MALLOC_MMAP_THRESHOLD_=131072)" if self.fixed_mmap_threshold else ""))
        if s.rss:
            marks = [s.rss[min(len(s.rss) - 1, round(i * (len(s.rss) - 1) / 10))] for i in range(11)]
            lines.append("server RSS MiB over the run: "
                         + ", ".join("%.0f s %.1f" % (t, k / 1024) for t, k in marks))
        if s.fds:
            lines.append("server file descriptors: start %d, max %d, end %d"
                         % (s.fds[0][1], max(n for _, n in s.fds), s.fds[-1][1]))
        lines.append("errors %d" % len(s.errors))
        return "\n".join(lines)

    def close(self) -> None:
        self._stop.set()
        self.world.stop()


class SoakTests(unittest.TestCase):
    """The soak, 60 seconds of load (C{bench/soak.py} runs it for longer)."""

    timeout = 300

    def test_soak_60_seconds(self) -> None:
        soak = Soak(seconds=60, seed=int(os.environ.get("POPSERVICE_SOAK_SEED", "1")), warmup=20,
                    flat_kib=5 * 1024, log=lambda s: None, progress_every=0, fixed_mmap_threshold=True)
        self.addCleanup(soak.close)
        stats = soak.run()
        problems = soak.verify()
        report = soak.report(problems)
        print("\n[measured] " + report.replace("\n", "\n           "))
        self.assertEqual(problems, [], report)
        self.assertEqual(stats.errors, [], report)
        self.assertGreater(stats.sessions, 100, report)
        self.assertGreater(stats.removals, 50, report)
        self.assertGreater(stats.deliveries_cli, 0, report)
        self.assertTrue(soak.rss_flat(), report)
        self.assertEqual(soak.world.log_text().count("Traceback"), 0, soak.world.log_tail())
