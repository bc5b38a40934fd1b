"""
Faults against a real C{twistd pop3} over Maildirs (issue "Reliability",
item 8): the server killed with SIGKILL, a full disk, a read-only Maildir,
messages removed or renamed by another program, deliveries racing sessions.

kill -9 (L{KillTrials}; C{bench/kill_trials.py} runs 100 and more on demand,
L{KillTrialTests} a short slice): a mailbox of a few hundred messages and a few
large ones; each trial logs in and then

 - C{update}: DELEs many messages, sends QUIT and SIGKILLs the server a
   random moment later, inside the measured length of UPDATE (the delays are
   stratified over that window, so early and late kills are both hit);
 - C{retr}: DELEs some messages, starts RETR of a large one and SIGKILLs the
   server after a random part of it arrived (no QUIT: nothing may go);
 - C{login}: puts ~150 new messages into C{new/} and SIGKILLs the server
   during the login that moves them to C{cur/} and gives them UIDLs.

After each kill the Maildir is compared with what it held before, the server
restarted and logged into once: nothing lost that was not DELE'd, nothing
removed unless DELE'd and QUIT sent, nothing unlinked coming back, the UIDL
index parseable by the store's own L{parse_index} and consistent, every UIDL
ever shown still naming the same message, and no C{[IN-USE]}.

Disk faults (L{DiskFaultTests}, one world; its server also serves LMTP):

 - ENOSPC: the Maildir of C{full} is a 4 MiB tmpfs filled to the last page
   (L{DiskFull}); where mounting is not allowed, the server is restarted with
   C{RLIMIT_FSIZE} below the index's size instead (writes of the index then
   fail with EFBIG, SIGXFSZ ignored; the log goes through a pipe so the limit
   never touches it);
 - a read-only Maildir (L{read_only}): C{chmod a-w}, or when the tests run as
   root, who ignores permission bits, C{chattr +i} on the directories (root
   gets EPERM as anyone gets EACCES from chmod).  Running the server
   unprivileged (twistd C{--uid}) works, but then C{popservice deliver}
   would have to run as that account too, which cannot execute an
   interpreter living under a private home directory;
 - a message file removed, or renamed, by another program mid-session;
 - deliveries (C{popservice deliver} subprocesses) while a session is open
   and while logins happen.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import random
import resource
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from twisted.trial import unittest

from popservice.stores.maildir import INDEX_FILE_NAME, base_name, parse_index
from popservice.stores.maildir.uidlist import _Index
from popservice.wire import transmitted_size as wire_size
from tests.interop.world import (
    BASE_TS,
    TIMEOUT,
    VENV_BIN,
    RawPOP,
    World,
    expected_retr,
    free_port,
    headers,
    shared_world,
)

MIB = 1024 * 1024
POPSERVICE = os.path.join(VENV_BIN, "popservice")


# -- looking at a Maildir -------------------------------------------------------------------------


def disk_bases(maildir: str) -> dict[str, str]:
    """Base name -> C{cur/NAME} or C{new/NAME} of every message file (as the store counts them)."""
    out: dict[str, str] = {}
    for sub in ("cur", "new"):
        try:
            names = os.listdir(os.path.join(maildir, sub))
        except FileNotFoundError:
            continue
        for name in names:
            if not name.startswith("."):
                out.setdefault(base_name(name), sub + "/" + name)
    return out


def read_index(maildir: str) -> tuple[_Index | None, bool]:
    """(the parsed C{popservice-uidlist} or None when unparseable, whether the file exists)."""
    try:
        with open(os.path.join(maildir, INDEX_FILE_NAME), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, False
    return parse_index(raw.decode("utf-8", "surrogateescape")), True


def index_problems(index: _Index | None, present: set[str] | dict[str, str] | None = None) -> list[str]:
    """What is wrong with an index: unparseable, duplicate UIDLs, a counter that would reuse one."""
    if index is None:
        return ["index unparseable"]
    problems = []
    uidls = [u for u, _ in index.entries.values()]
    if len(set(uidls)) != len(uidls):
        problems.append("duplicate UIDLs in the index")
    tail = "%08x" % index.uidvalidity
    own = []
    for u in uidls:
        if len(u) == 16 and u.endswith(tail):
            with contextlib.suppress(ValueError):
                own.append(int(u[:8], 16))
    if own and max(own) >= index.next_uid:
        problems.append("index counter N%d not above UIDL %d" % (index.next_uid, max(own)))
    if present is not None and set(index.entries) != set(present):
        problems.append("index lists %d messages, disk has %d (%d differ)"
                        % (len(index.entries), len(present), len(set(index.entries) ^ set(present))))
    return problems


def uidl_listing(c: RawPOP) -> dict[int, str]:
    """Message number -> UIDL from a UIDL command."""
    status, body = c.multi(b"UIDL")
    if not status.startswith(b"+OK"):
        raise AssertionError("UIDL answered %r" % (status,))
    out = {}
    for line in body.decode("ascii").splitlines():
        n, u = line.split()
        out[int(n)] = u
    return out


def message_id(data: bytes) -> str | None:
    """The Message-ID of a stored or retrieved message (header part only)."""
    head = data.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    for line in head.splitlines():
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().decode("ascii", "replace")
    return None


def read_socket_until_closed(sock: socket.socket, timeout: float = 2.0) -> bytes:
    """Whatever the peer sent before it closed (or C{timeout} passed)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return data


class PipedWorld(World):
    """
    A world whose server logs to a pipe (copied into C{twistd.log} by a
    thread, so no file descriptor is left open per start and no
    C{RLIMIT_FSIZE} ever applies to the log), which can be SIGKILLed and
    started again.
    """

    def __init__(self, name: str, extra_args: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(name, extra_args)
        self._drain: threading.Thread | None = None
        #: extra environment variables of the server
        self.server_env: dict[str, str] = {}

    def command_line(self) -> list[str]:
        argv = super().command_line()
        argv[argv.index("-l") + 1] = "-"
        return argv

    def preexec(self) -> None:
        """Runs in the server's process before exec."""

    def start(self) -> None:
        last_error: Exception | None = None
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port, self.tls_port = free_port(), free_port()
            if self.port == self.tls_port:
                continue
            self.process = subprocess.Popen(self.command_line(), cwd=self.root, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            preexec_fn=self.preexec, env={**os.environ, **self.server_env})
            self._drain = threading.Thread(target=self._copy_log, args=(self.process.stdout,), daemon=True)
            self._drain.start()
            try:
                self._wait_ready()
                return
            except Exception as e:  # noqa: BLE001
                last_error = e
                self.stop_process()
        raise RuntimeError("twistd pop3 did not start: %s\n--- log ---\n%s" % (last_error, self.log_tail()))

    def _copy_log(self, pipe: BinaryIO) -> None:
        with open(self.log, "ab") as out:
            for line in iter(pipe.readline, b""):
                out.write(line)
                out.flush()

    def stop_process(self) -> None:
        super().stop_process()
        self._join_drain()

    def _join_drain(self) -> None:
        if self._drain is not None:
            self._drain.join(10)
            self._drain = None

    def kill9(self) -> None:
        """SIGKILL the server and reap it."""
        p, self.process = self.process, None
        if p is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        self._join_drain()
        if p.stdout:
            p.stdout.close()


# -- kill -9 --------------------------------------------------------------------------------------


@dataclass
class KillCounts:
    trials: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    #: not DELE'd (or no QUIT sent) and gone
    lost: int = 0
    #: unlinked before the kill (or never there) and back after it
    resurrected: int = 0
    #: a message shown with one UIDL shown later with another, or a UIDL naming another message
    uidl_changes: int = 0
    #: the first login after the restart answered [IN-USE]
    blocked_logins: int = 0
    #: index unparseable, duplicate UIDLs, counter not above them, or not matching the disk after a login
    index_invalid: int = 0
    #: QUIT answered +OK but a DELE'd message is still there
    unremoved_after_ok: int = 0
    #: other wrong answers (a login or UIDL refused ...)
    other: int = 0
    #: where the kills landed, per kind
    phases: collections.Counter[str] = field(default_factory=collections.Counter)
    #: C{popservice-uidlist.tmp.*} files left by a kill during an index write
    tmp_leftovers: int = 0
    #: the measured length of each killed operation (the kill window is 5/4 of it)
    windows: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def failures(self) -> int:
        return (self.lost + self.resurrected + self.uidl_changes + self.blocked_logins + self.index_invalid
                + self.unremoved_after_ok + self.other)

    def summary(self) -> str:
        lines = [
            "trials %d (%s)" % (self.trials, ", ".join("%s %d" % kv for kv in sorted(self.kinds.items()))),
            "messages lost %d, resurrected %d, UIDL changes %d, blocked logins %d"
            % (self.lost, self.resurrected, self.uidl_changes, self.blocked_logins),
            "index invalid %d, DELE'd but kept after +OK %d, other errors %d"
            % (self.index_invalid, self.unremoved_after_ok, self.other),
            "kills landed: " + ", ".join("%s %d" % kv for kv in sorted(self.phases.items())),
            "kill windows at the end: " + ", ".join("%s %.1f ms" % (k, v * 1250) for k, v in
                                                    sorted(self.windows.items())),
            "index temporary files left by kills: %d" % self.tmp_leftovers,
        ]
        return "\n".join(lines)


class KillTrials:
    """
    SIGKILL trials against a real C{twistd pop3} (see the module docstring).
    L{run} runs them; L{counts} holds the figures; L{close} removes the world.
    """

    USER = "victim"
    PASSWORD = "victimpw"

    def __init__(self, *, seed: int = 1, small: int = 300, large: int = 3, large_size: int = 6 * MIB,
                 max_dele: int = 150, fresh: int = 150, log: Callable[[str], None] = print) -> None:
        self.rng = random.Random(seed)
        self.small_target = small
        self.large_target = large
        self.max_dele = min(max_dele, small - 1)
        self.fresh = fresh
        self.log = log
        self.counts = KillCounts()
        self.world = PipedWorld("kill")
        self.world.add_user(self.USER, self.PASSWORD, [])
        self.maildir = self.world.maildir(self.USER)
        self._n = 0
        body = [b"block %06d " % i + b"0123456789abcdef" * 4 + b"\n" for i in range(large_size // 78 + 1)]
        self._large_body = b"".join(body)
        #: every UIDL ever shown, both ways: base -> UIDL and UIDL -> base
        self.uidl_of: dict[str, str] = {}
        self.base_of: dict[str, str] = {}
        self.windows: dict[str, float] = self.counts.windows

    # building

    def _write(self, large: bool, where: str = "new") -> str:
        self._n += 1
        n = self._n
        tag = b"kill-large" if large else b"kill"
        head = headers(self.USER, n, b"%s message %d" % (tag, n))
        if large:
            stored = head + b"\n" + self._large_body
        else:
            stored = head + b"\n" + b"".join(b"line %d of message %d\n" % (j, n)
                                             for j in range(self.rng.randint(1, 40)))
        base = "%d.M%06dP%dQ%d.%s" % (BASE_TS + 10**6 + n, n, os.getpid(), n, tag.decode())
        name = base + (",S=%d,W=%d" % (len(stored), wire_size([stored])) if n % 2 else "")
        with open(os.path.join(self.maildir, where, name), "wb") as f:
            f.write(stored)
        return base

    def replenish(self) -> None:
        present = disk_bases(self.maildir)
        large = sum(1 for b in present if b.endswith("kill-large"))
        for _ in range(self.large_target - large):
            self._write(True)
        for _ in range(self.small_target - (len(present) - large)):
            self._write(False)

    # sessions

    def _learn(self, listing: dict[int, str]) -> dict[int, str] | None:
        """Number -> base for a session's listing, through the index; checks every UIDL against history."""
        index, _ = read_index(self.maildir)
        problems = index_problems(index)
        if problems or index is None:
            self._fail("index_invalid", "after login: %s" % "; ".join(problems))
            return None
        by_uidl = {u: b for b, (u, _) in index.entries.items()}
        out = {}
        for n, u in listing.items():
            b = by_uidl.get(u)
            if b is None:
                self._fail("other", "UIDL %s listed but not in the index" % u)
                continue
            out[n] = b
            if self.uidl_of.setdefault(b, u) != u:
                self._fail("uidl_changes", "%s was %s, now %s" % (b, self.uidl_of[b], u))
            if self.base_of.setdefault(u, b) != b:
                self._fail("uidl_changes", "UIDL %s named %s, now %s" % (u, self.base_of[u], b))
        return out

    def _fail(self, counter: str, what: str) -> None:
        setattr(self.counts, counter, getattr(self.counts, counter) + 1)
        if len(self.counts.problems) < 50:
            self.counts.problems.append("trial %d: %s: %s" % (self.counts.trials, counter, what))
        self.log("  ! %s: %s" % (counter, what))

    def _session(self) -> tuple[RawPOP, dict[int, str], dict[int, str]]:
        c = self.world.session(self.USER)
        listing = uidl_listing(c)
        bases = self._learn(listing) or {}
        return c, listing, bases

    # the trials

    def calibrate(self) -> None:
        """The kill windows: UPDATE of 3/4 of max_dele DELEs, a login moving C{fresh} new messages."""
        self.replenish()
        c, listing, _ = self._session()
        k = max(1, self.max_dele * 3 // 4)
        numbers = self.rng.sample(sorted(listing), k)
        c.send(b"".join(b"DELE %d\r\n" % n for n in numbers))
        for _ in numbers:
            c.line()
        t0 = time.monotonic()
        r = c.quit()
        self.windows["update"] = time.monotonic() - t0
        if not r.startswith(b"+OK"):
            raise RuntimeError("calibration QUIT answered %r" % (r,))
        self.replenish()
        c, _, _ = self._session()
        c.quit()
        for _ in range(self.fresh):
            self._write(False)
        t0 = time.monotonic()
        c = self.world.connect()
        r = c.login(self.USER, self.PASSWORD)
        self.windows["login"] = time.monotonic() - t0
        if not r.startswith(b"+OK"):
            raise RuntimeError("calibration login answered %r" % (r,))
        self._learn(uidl_listing(c))
        c.quit()
        self.log("measured: UPDATE of %d DELEs %.1f ms, login moving %d new messages %.1f ms"
                 % (k, self.windows["update"] * 1000, self.fresh, self.windows["login"] * 1000))

    def window(self, kind: str) -> float:
        """The kill window of C{kind}: the measured time and a quarter more (then L{adapt}ed)."""
        return min(0.5, max(0.002, 1.25 * self.windows[kind]))

    def adapt(self, kind: str, position: float, replied: bool) -> None:
        """
        Keep the end of the operation at about 4/5 of the kill window: its
        length varies from trial to trial (and with the disk's mood), so the
        calibration only starts it.  A kill early in the window that came
        after the answer shrinks it; one late in it that came before grows it.
        """
        if replied and position < 0.8:
            self.windows[kind] *= 0.85
        elif not replied and position > 0.8:
            self.windows[kind] *= 1.15

    def plan(self, trials: int) -> list[tuple[str, float]]:
        """(kind, position in the kill window 0..1), stratified per kind, shuffled."""
        n_retr = max(1, trials // 5) if trials >= 3 else 0
        n_login = max(1, trials // 10) if trials >= 3 else 0
        n_update = trials - n_retr - n_login
        out = []
        for kind, n in (("update", n_update), ("retr", n_retr), ("login", n_login)):
            out += [(kind, (j + self.rng.random()) / n) for j in range(n)]
        self.rng.shuffle(out)
        return out

    def run(self, trials: int, progress_every: int = 10) -> KillCounts:
        if not self.world.alive():
            self.world.start()
        if not self.windows:
            self.calibrate()
        started = time.monotonic()
        for i, (kind, position) in enumerate(self.plan(trials), start=1):
            self.counts.trials += 1
            self.counts.kinds[kind] += 1
            getattr(self, "trial_" + kind)(position)
            if progress_every and i % progress_every == 0:
                self.log("%d trials, %.0f s, failures so far %d" % (i, time.monotonic() - started,
                                                                    self.counts.failures()))
        return self.counts

    def trial_update(self, position: float) -> None:
        self.replenish()
        c, listing, bases = self._session()
        before = set(disk_bases(self.maildir))
        candidates = [n for n in listing if not bases.get(n, "").endswith("kill-large")]
        k = self.rng.randint(max(1, self.max_dele // 2), self.max_dele)
        numbers = self.rng.sample(candidates, min(k, len(candidates)))
        c.send(b"".join(b"DELE %d\r\n" % n for n in numbers))
        for _ in numbers:
            r = c.line()
            if not r.startswith(b"+OK"):
                self._fail("other", "DELE answered %r" % (r,))
        deleted = {bases[n] for n in numbers if n in bases}
        delay = position * self.window("update")
        c.send(b"QUIT\r\n")
        time.sleep(delay)
        self.world.kill9()
        got = read_socket_until_closed(c.sock)
        c.close()
        got_ok = got.startswith(b"+OK")
        at_kill = set(disk_bases(self.maildir))
        removed = deleted - at_kill
        index, exists = read_index(self.maildir)
        if got_ok:
            phase = "after the +OK"
        elif not removed:
            phase = "before any unlink"
        elif len(removed) < len(deleted):
            phase = "mid-unlink"
        elif index is not None and any(b in index.entries for b in removed):
            phase = "all unlinked, index not yet rewritten"
        else:
            phase = "index rewritten, before the +OK"
        self.counts.phases["update: " + phase] += 1
        self.adapt("update", position, got_ok)
        if got_ok and deleted & at_kill:
            self._fail("unremoved_after_ok", "%d DELE'd messages kept after +OK" % len(deleted & at_kill))
        self._after_kill(before, deleted, at_kill, index, exists)

    def trial_retr(self, position: float) -> None:
        self.replenish()
        c, listing, bases = self._session()
        before = set(disk_bases(self.maildir))
        large = [n for n, b in bases.items() if b.endswith("kill-large")]
        if not large:
            self._fail("other", "no large message listed")
            c.close()
            return
        numbers = self.rng.sample(sorted(listing), self.rng.randint(0, min(20, len(listing))))
        c.send(b"".join(b"DELE %d\r\n" % n for n in numbers))
        for _ in numbers:
            c.line()
        target = self.rng.choice(large)
        size = len(self._large_body)
        want = int(position * size)
        c.send(b"RETR %d\r\n" % target)
        got = len(c.buf)
        c.buf = b""
        while got < want:
            data = c.sock.recv(min(1 << 16, want - got))
            if not data:
                break
            got += len(data)
        self.world.kill9()
        c.close()
        self.counts.phases["retr: %d%% of the message read" % (min(99, 100 * got // size) // 25 * 25)] += 1
        at_kill = set(disk_bases(self.maildir))
        index, exists = read_index(self.maildir)
        self._after_kill(before, set(), at_kill, index, exists)

    def trial_login(self, position: float) -> None:
        self.replenish()
        fresh = {self._write(False) for _ in range(self.fresh)}
        before = set(disk_bases(self.maildir))
        c = self.world.connect()
        c.send(b"USER %s\r\nPASS %s\r\n" % (self.USER.encode(), self.PASSWORD.encode()))
        time.sleep(position * self.window("login"))
        self.world.kill9()
        got = read_socket_until_closed(c.sock)
        c.close()
        index, exists = read_index(self.maildir)
        in_new = {base_name(n) for n in os.listdir(os.path.join(self.maildir, "new"))}
        if got.count(b"+OK") >= 2:
            phase = "after the +OK"
        elif not fresh - in_new:
            phase = "before moving new/"
        elif fresh & in_new:
            phase = "mid-move"
        elif index is not None and not fresh & set(index.entries):
            phase = "moved, index not yet written"
        else:
            phase = "index written, before the +OK"
        self.counts.phases["login: " + phase] += 1
        self.adapt("login", position, phase == "after the +OK")
        self._after_kill(before, set(), set(disk_bases(self.maildir)), index, exists)

    def _after_kill(self, before: set[str], deletable: set[str], at_kill: set[str], index: _Index | None,
                    exists: bool) -> None:
        """The checks after a kill, the restart, and the first login."""
        lost = (before - deletable) - at_kill
        if lost:
            self._fail("lost", "%d messages gone that were not DELE'd: %s" % (len(lost), sorted(lost)[:3]))
        appeared = at_kill - before
        if appeared:
            self._fail("resurrected", "%d files appeared at the kill" % len(appeared))
        if exists:
            problems = index_problems(index)
            if problems:
                self._fail("index_invalid", "at the kill: %s" % "; ".join(problems))
        leftovers = [n for n in os.listdir(self.maildir) if n.startswith(INDEX_FILE_NAME + ".tmp.")]
        self.counts.tmp_leftovers += len(leftovers)
        for n in leftovers:  # counted once, then out of the way
            os.unlink(os.path.join(self.maildir, n))
        self.world.start()
        c = self.world.connect()
        r = c.login(self.USER, self.PASSWORD)
        if r.startswith(b"-ERR [IN-USE]"):
            self._fail("blocked_logins", "first login after the restart: %r" % (r,))
            c.close()
            c = self.world.session(self.USER)
        elif not r.startswith(b"+OK"):
            self._fail("other", "first login after the restart: %r" % (r,))
            c.close()
            c = self.world.session(self.USER)
        listing = uidl_listing(c)
        r = c.quit()
        if not r.startswith(b"+OK"):
            self._fail("other", "QUIT answered %r" % (r,))
        now = disk_bases(self.maildir)
        back = set(now) - at_kill
        if back:
            self._fail("resurrected", "%d files back after the restart: %s" % (len(back), sorted(back)[:3]))
        gone = at_kill - set(now)
        if gone:
            self._fail("lost", "%d files gone at the login after the restart" % len(gone))
        index, _ = read_index(self.maildir)
        problems = index_problems(index, now)
        if problems:
            self._fail("index_invalid", "after the restart: %s" % "; ".join(problems))
        bases = self._learn(listing) or {}
        listed = set(bases.values())
        if listed - at_kill:
            self._fail("resurrected", "%d unlinked messages listed again" % len(listed - at_kill))
        unlisted = (at_kill & set(self.uidl_of)) - listed
        if unlisted:
            self._fail("other", "%d messages on disk not listed" % len(unlisted))

    def close(self) -> None:
        self.world.stop()

    def server_tracebacks(self) -> int:
        try:
            return self.world.log_text().count("Traceback")
        except OSError:
            return 0


class KillTrialTests(unittest.TestCase):
    """A slice of C{bench/kill_trials.py}: 10 SIGKILL trials (7 in UPDATE, 2 mid-RETR, 1 in the login)."""

    timeout = 300

    def test_kill9_trials(self) -> None:
        trials = KillTrials(seed=int(os.environ.get("POPSERVICE_KILL_SEED", "8")), small=200, large=2,
                            large_size=4 * MIB, max_dele=100, fresh=100, log=lambda s: None)
        self.addCleanup(trials.close)
        counts = trials.run(10, progress_every=0)
        print("\n[measured] " + counts.summary().replace("\n", "\n           "))
        self.assertEqual(counts.trials, 10)
        self.assertEqual(counts.failures(), 0, counts.summary() + "\n" + "\n".join(counts.problems))
        self.assertEqual(trials.server_tracebacks(), 0, trials.world.log_tail())


# -- disk faults ----------------------------------------------------------------------------------


def _can_mount_tmpfs(where: str) -> bool:
    """Root, and mounting allowed (C{POPSERVICE_FAULTS_NO_TMPFS=1} forces the RLIMIT_FSIZE way)."""
    if os.geteuid() != 0 or not shutil.which("mount") or os.environ.get("POPSERVICE_FAULTS_NO_TMPFS"):
        return False
    probe = tempfile.mkdtemp(dir=where)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True,
                           timeout=10)
        if r.returncode != 0:
            return False
        subprocess.run(["umount", probe], capture_output=True, timeout=10)
        return True
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe)


class FaultWorld(PipedWorld):
    """
    The disk-fault world: the server's log goes through a pipe (so
    C{RLIMIT_FSIZE} never limits it), it also serves LMTP, and the Maildir of
    user C{full} is a small tmpfs when mounting is allowed.
    """

    TMPFS_SIZE = 4 * MIB

    def __init__(self, name: str, extra_args: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(name, extra_args)
        #: RLIMIT_FSIZE of the next server started (None: unlimited)
        self.fsize: int | None = None
        self.mounts: list[str] = []
        #: whether the Maildir of C{full} is a tmpfs
        self.tmpfs = False
        self.lmtp_port = 0
        self.last_delivery_output = b""

    def mount_tmpfs(self, user: str) -> bool:
        d = os.path.join(self.mail, user)
        os.makedirs(d, exist_ok=True)
        if not _can_mount_tmpfs(self.root):
            return False
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d,mode=0700" % self.TMPFS_SIZE, "tmpfs", d],
                           capture_output=True, timeout=10)
        if r.returncode != 0:
            return False
        self.mounts.append(d)
        return True

    def command_line(self) -> list[str]:
        return super().command_line() + ["--lmtp", "tcp:%d:interface=127.0.0.1" % self.lmtp_port]

    def start(self) -> None:
        self.lmtp_port = free_port()
        super().start()

    def preexec(self) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if self.fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize, self.fsize))

    def restart(self, fsize: int | None = None) -> None:
        self.stop_process()
        self.fsize = fsize
        self.start()

    def stop(self) -> None:
        self.stop_process()
        for d in self.mounts:
            subprocess.run(["umount", "-l", d], capture_output=True, timeout=10)
        self.mounts = []
        super().stop()

    def deliver(self, user: str, message: bytes, fsize: int | None = None) -> int:
        """C{popservice deliver USER} (the store's own delivery, another process): its exit status."""
        def limits() -> None:
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        r = subprocess.run([POPSERVICE, "deliver", user, "--mail", "maildir:%s/%%u" % self.mail],
                           input=message, capture_output=True, timeout=TIMEOUT, preexec_fn=limits)
        self.last_delivery_output = r.stderr
        return int(r.returncode)

    def lmtp(self, user: str, message: bytes) -> tuple[int, bytes]:
        """One message over the server's LMTP: the reply after the data."""
        with smtplib.LMTP("127.0.0.1", self.lmtp_port, timeout=TIMEOUT) as client:
            client.ehlo_or_helo_if_needed()
            code, text = client.mail("sender@example.org")
            if code != 250:
                return code, text
            code, text = client.rcpt("%s@example.org" % user)
            if code != 250:
                return code, text
            return client.data(message)


@contextlib.contextmanager
def read_only(paths: list[str]) -> Iterator[str]:
    """
    Make directories read-only for the server: C{chmod a-w}, or when we are
    root (root ignores permission bits) the immutable attribute (C{chattr +i}:
    no file may be created, renamed or removed in it, by root either; the
    files inside stay as writable as before, as with chmod).  Yields how.
    """
    if os.geteuid() != 0:
        modes = [(p, os.stat(p).st_mode & 0o7777) for p in paths]
        for p, mode in modes:
            os.chmod(p, mode & ~0o222)
        try:
            yield "chmod a-w"
        finally:
            for p, mode in modes:
                os.chmod(p, mode)
        return
    done = []
    try:
        for p in paths:
            r = subprocess.run(["chattr", "+i", p], capture_output=True, timeout=10)
            if r.returncode != 0:
                raise unittest.SkipTest("chattr +i is not supported here: %r" % (r.stderr,))
            done.append(p)
        yield "chattr +i (the tests run as root)"
    finally:
        for p in done:
            subprocess.run(["chattr", "-i", p], capture_output=True, timeout=10)


class DiskFull:
    """
    ENOSPC for the Maildir of C{user}: on a tmpfs, a filler file takes every
    last page; without a tmpfs, the server is restarted with C{RLIMIT_FSIZE}
    smaller than that Maildir's index (writes of it fail with EFBIG).
    """

    FSIZE = 4096

    def __init__(self, world: FaultWorld, user: str, tmpfs: bool) -> None:
        self.world = world
        self.tmpfs = tmpfs
        self.filler = os.path.join(world.maildir(user), "filler")
        self.full = False

    @property
    def how(self) -> str:
        if self.tmpfs:
            return "ENOSPC (a %d MiB tmpfs filled)" % (FaultWorld.TMPFS_SIZE // MIB)
        return "EFBIG (RLIMIT_FSIZE %d on the server)" % self.FSIZE

    def fill(self, leave: int = 0) -> None:
        """Take all the space (tmpfs: but C{leave} bytes, whole pages)."""
        if self.tmpfs:
            fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                for size in (1 << 16, 4096, 1):
                    while True:
                        try:
                            os.write(fd, b"\0" * size)
                        except OSError as e:
                            if e.errno != errno.ENOSPC:
                                raise
                            break
                if leave:
                    os.ftruncate(fd, os.fstat(fd).st_size // 4096 * 4096 - leave)
            finally:
                os.close(fd)
        else:
            self.world.restart(fsize=self.FSIZE)
        self.full = True

    def release(self) -> None:
        if not self.full:
            return
        self.full = False
        if self.tmpfs:
            os.unlink(self.filler)
        else:
            self.world.restart(fsize=None)

    def delivery_fsize(self) -> int | None:
        """The limit a delivery process gets while the disk is 'full' (tmpfs: none needed)."""
        return None if self.tmpfs else self.FSIZE


def clear_tmp(maildir: str) -> None:
    for name in os.listdir(os.path.join(maildir, "tmp")):
        os.unlink(os.path.join(maildir, "tmp", name))


def fault_messages(user: str, count: int, first: int = 1) -> list[tuple[str, bytes]]:
    out = []
    for i in range(first, first + count):
        body = b"".join(b"Message %d for %s, line %d.\n" % (i, user.encode(), j) for j in range(1, 4 + i % 7))
        out.append(("simple", headers(user, i, b"Message %d for %s" % (i, user.encode())) + b"\n" + body))
    return out


def new_message(user: str, n: int, size: int = 600) -> bytes:
    body = b"".join(b"delivered line %d\n" % j for j in range(size // 18))
    return headers(user, n, b"Delivered %d" % n).replace(b"interop.popservice", b"delivered.popservice") \
        + b"\n" + body


#: the fault world's users and how many messages each starts with
FAULT_USERS = {"full": 200, "ro": 10, "ronew": 10, "rocur": 6, "rofresh": 4, "gone": 5, "renamed": 5,
               "race": 5, "racelogin": 3, "stale": 3}


def build_faults(world: FaultWorld) -> None:
    world.tmpfs = world.mount_tmpfs("full")
    for name, count in FAULT_USERS.items():
        world.add_user(name, name + "pw", fault_messages(name, count))


class DiskFaultTests(unittest.TestCase):
    """Full disk, read-only Maildir, files vanishing or renamed, deliveries racing sessions."""

    timeout = 120

    def setUp(self) -> None:
        self.world: FaultWorld = shared_world(__name__, build_faults, world_class=FaultWorld)  # type: ignore
        self.assertTrue(self.world.alive(), "server died earlier:\n" + self.world.log_tail())

    def tearDown(self) -> None:
        self.assertTrue(self.world.alive(), "server died:\n" + self.world.log_tail())

    # helpers

    def session(self, user: str) -> RawPOP:
        c = self.world.session(user)
        self.addCleanup(c.close)
        return c

    def listing(self, user: str) -> dict[int, str]:
        c = self.session(user)
        listing = uidl_listing(c)
        self.assertTrue(c.quit().startswith(b"+OK"))
        return listing

    def retr(self, c: RawPOP, n: int) -> bytes:
        status, body = c.multi(b"RETR %d" % n)
        self.assertTrue(status.startswith(b"+OK"), status)
        return body

    def original(self, user: str, n: int) -> bytes:
        return self.world.users[user].messages[n - 1].retr

    def on_disk(self, user: str, uidl: str) -> bytes:
        """What RETR of the message with this UIDL must give, from its file."""
        maildir = self.world.maildir(user)
        index, _ = read_index(maildir)
        assert index is not None
        base = {u: b for b, (u, _) in index.entries.items()}[uidl]
        with open(os.path.join(maildir, disk_bases(maildir)[base]), "rb") as f:
            return expected_retr(f.read())

    def assert_logged(self, offset: int, text: str, within: float = 5.0) -> None:
        """The server's log, from C{offset} on, says C{text} (it arrives through a pipe: waits a little)."""
        deadline = time.monotonic() + within
        while True:
            with open(self.world.log, errors="replace") as f:
                f.seek(offset)
                if text in f.read():
                    return
            if time.monotonic() > deadline:
                self.fail("the server did not log %r" % (text,))
            time.sleep(0.05)

    def present(self, user: str) -> set[str]:
        return set(disk_bases(self.world.maildir(user)))

    def assert_index_matches_disk(self, user: str) -> None:
        index, exists = read_index(self.world.maildir(user))
        self.assertTrue(exists)
        self.assertEqual(index_problems(index, disk_bases(self.world.maildir(user))), [])

    def disk(self, user: str = "full") -> DiskFull:
        d = DiskFull(self.world, user, self.world.tmpfs)
        self.addCleanup(d.release)
        return d

    # ENOSPC

    def test_enospc_login_hides_new_mail_keeps_old(self) -> None:
        """
        Disk full while the login must write the index (new mail arrived):
        the session opens with the old messages and their UIDLs; the new ones
        wait (no UIDL is shown that is not on disk); they show once there is room.
        """
        user = "full"
        before = self.listing(user)
        files = self.present(user)
        for i in range(3):
            self.assertEqual(self.world.deliver(user, new_message(user, 500 + i)), 0,
                             self.world.last_delivery_output)
        self.assertEqual(len(self.present(user) - files), 3)
        disk = self.disk()
        log_size = os.path.getsize(self.world.log)
        disk.fill()
        c = self.session(user)
        self.assertEqual(uidl_listing(c), before, disk.how)
        for n in (1, len(before)):
            self.assertEqual(self.retr(c, n), self.on_disk(user, before[n]))
        self.assertTrue(c.command(b"NOOP").startswith(b"+OK"))
        self.assertTrue(c.quit().startswith(b"+OK"))
        self.assert_logged(log_size, "cannot write popservice-uidlist")
        disk.release()
        after = self.listing(user)
        self.assertEqual(len(after), len(before) + 3)
        self.assertEqual({n: after[n] for n in before}, before)  # new mail is newer: numbered after
        self.assertEqual(len(set(after.values())), len(after))
        self.assert_index_matches_disk(user)

    def test_enospc_update_deletes_and_does_not_resurrect(self) -> None:
        """
        Disk full while UPDATE rewrites the index: the messages are removed,
        QUIT answers +OK; the stale index never brings them back, and every
        other message keeps its UIDL, full disk or not.
        """
        user = "full"
        before = self.listing(user)
        disk = self.disk()
        disk.fill()
        log_size = os.path.getsize(self.world.log)
        c = self.session(user)
        self.assertEqual(uidl_listing(c), before)
        for n in (2, 3):
            self.assertTrue(c.command(b"DELE %d" % n).startswith(b"+OK"))
        r = c.quit()
        self.assertTrue(r.startswith(b"+OK") or r.startswith(b"-ERR [SYS/TEMP]"), r)
        self.assert_logged(log_size, "cannot update popservice-uidlist after deleting")
        kept = {n: u for n, u in before.items() if n not in (2, 3)}
        files = self.present(user)
        gone = {self.world.users[user].messages[n - 1].base for n in (2, 3)}
        if r.startswith(b"+OK"):
            self.assertFalse(files & gone)
        # still full: the listing must not bring them back
        again = self.listing(user)
        self.assertEqual(sorted(again.values()), sorted(kept.values()) if r.startswith(b"+OK")
                         else sorted(before.values()))
        disk.release()
        final = self.listing(user)
        self.assertEqual(sorted(final.values()), sorted(again.values()))
        self.assert_index_matches_disk(user)

    def test_enospc_delivery_temporary_failure(self) -> None:
        """
        A delivery into a full disk fails temporarily (C{popservice deliver}
        exits 75, LMTP answers 452), leaves nothing behind, and works later.
        """
        user = "full"
        self.listing(user)  # indexed while there is room (a mailbox never indexed would list nothing)
        disk = self.disk()
        disk.fill()
        message = new_message(user, 900, size=20000)
        files = self.present(user)
        status = self.world.deliver(user, message, fsize=disk.delivery_fsize())
        self.assertEqual(status, 75, self.world.last_delivery_output)
        code, text = self.world.lmtp(user, message)  # through the server: 452 out of space (451: EFBIG)
        self.assertEqual(code, 452 if disk.tmpfs else 451, text)
        self.assertEqual(self.present(user), files)
        clear_tmp(self.world.maildir(user))  # see test_failed_delivery_leaves_no_partial_file_in_tmp
        c = self.session(user)  # the mailbox still serves
        self.assertTrue(c.command(b"STAT").startswith(b"+OK %d " % len(files)))
        self.assertTrue(c.quit().startswith(b"+OK"))
        disk.release()
        self.assertEqual(self.world.deliver(user, message), 0, self.world.last_delivery_output)
        self.assertEqual(self.world.deliver(user, message), 0)  # the retry stores nothing twice
        self.assertEqual(len(self.present(user) - files), 1)

    def test_failed_delivery_leaves_no_partial_file_in_tmp(self) -> None:
        """
        A delivery that fails for want of space removes what it wrote into
        tmp/.  Otherwise the partial file keeps that space until the stale-tmp
        sweep (36 hours) and a smaller message, which would have fit, fails too.
        """
        user = "full"
        disk = self.disk()
        disk.fill(leave=64 * 1024)
        tmp = os.path.join(self.world.maildir(user), "tmp")
        self.addCleanup(clear_tmp, self.world.maildir(user))
        files = self.present(user)
        big = new_message(user, 910, size=256 * 1024)
        self.assertEqual(self.world.deliver(user, big, fsize=disk.delivery_fsize()), 75)
        left = {name: os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp)}
        code, text = self.world.lmtp(user, big)
        self.assertEqual(code, 452 if disk.tmpfs else 451, text)
        left_lmtp = {name: os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp)}
        if disk.tmpfs:
            small = new_message(user, 911, size=8 * 1024)
            self.assertEqual(self.world.deliver(user, small), 0,
                             "a small message no longer fits: %r left in tmp/" % (left,))
        self.assertEqual(left, {}, "popservice deliver left its partial file in tmp/")
        self.assertEqual(left_lmtp, {}, "the LMTP delivery left its partial file in tmp/")
        self.assertEqual(len(self.present(user) - files), 1 if disk.tmpfs else 0)


    # read-only Maildir

    def maildir_dirs(self, user: str, *subs: str) -> list[str]:
        d = self.world.maildir(user)
        return [os.path.join(d, s) if s else d for s in subs]

    def test_readonly_maildir_update_fails_cleanly(self) -> None:
        """Maildir made read-only mid-session: QUIT answers -ERR [SYS/TEMP], nothing is lost or renumbered."""
        user = "ro"
        before = self.listing(user)
        files = self.present(user)
        c = self.session(user)
        for n in (1, 2, 5):
            self.assertTrue(c.command(b"DELE %d" % n).startswith(b"+OK"))
        with read_only(self.maildir_dirs(user, "", "cur", "new", "tmp")):
            r = c.quit()
            self.assertTrue(r.startswith(b"-ERR [SYS/TEMP]"), r)
            self.assertEqual(self.present(user), files)
            c2 = self.session(user)  # the lock was released: the mailbox serves, read-only
            self.assertEqual(uidl_listing(c2), before)
            self.assertEqual(self.retr(c2, 1), self.original(user, 1))
            self.assertTrue(c2.quit().startswith(b"+OK"))
        self.assertEqual(self.listing(user), before)
        c = self.session(user)
        self.assertTrue(c.command(b"DELE 1").startswith(b"+OK"))
        self.assertTrue(c.quit().startswith(b"+OK"))
        self.assertEqual(self.listing(user), {n - 1: u for n, u in before.items() if n != 1})

    def test_readonly_maildir_login_with_new_mail(self) -> None:
        """Read-only Maildir, new mail in new/: old messages served with their UIDLs, the new ones later."""
        user = "ronew"
        before = self.listing(user)
        for i in range(2):
            self.assertEqual(self.world.deliver(user, new_message(user, 600 + i)), 0)
        with read_only(self.maildir_dirs(user, "", "cur", "new", "tmp")):
            c = self.session(user)
            self.assertEqual(uidl_listing(c), before)
            self.assertEqual(self.retr(c, 3), self.original(user, 3))
            self.assertTrue(c.quit().startswith(b"+OK"))
        after = self.listing(user)
        self.assertEqual(len(after), len(before) + 2)
        self.assertEqual({n: after[n] for n in before}, before)
        self.assert_index_matches_disk(user)

    def test_readonly_cur_partial_update(self) -> None:
        """
        Only cur/ read-only: the new/ messages stay in new/ (listed), DELE of
        one in cur/ and one in new/ answers -ERR [SYS/TEMP] at QUIT; the one
        in new/ is gone, the other kept with its UIDL.
        """
        user = "rocur"
        self.listing(user)
        self.assertEqual(self.world.deliver(user, new_message(user, 700)), 0)
        with read_only(self.maildir_dirs(user, "cur")):
            c = self.session(user)
            listing = uidl_listing(c)
            self.assertEqual(len(listing), 7)
            new_number = 7  # the newest
            self.assertTrue(c.command(b"DELE 1").startswith(b"+OK"))
            self.assertTrue(c.command(b"DELE %d" % new_number).startswith(b"+OK"))
            r = c.quit()
            self.assertTrue(r.startswith(b"-ERR [SYS/TEMP]"), r)
        after = self.listing(user)
        self.assertEqual(sorted(after.values()), sorted(u for n, u in listing.items() if n != new_number))
        self.assert_index_matches_disk(user)

    def test_readonly_fresh_maildir_login_refused_cleanly(self) -> None:
        """A read-only Maildir never opened (no lock file can be made): -ERR [SYS/TEMP], QUIT still works."""
        user = "rofresh"
        files = self.present(user)
        with read_only(self.maildir_dirs(user, "", "cur", "new", "tmp")):
            c = self.world.connect()
            self.addCleanup(c.close)
            r = c.login(user, user + "pw")
            self.assertTrue(r.startswith(b"-ERR [SYS/TEMP]"), r)
            self.assertTrue(c.command(b"NOOP").startswith(b"-ERR"))  # still in AUTHORIZATION
            self.assertTrue(c.quit().startswith(b"+OK"))
        self.assertEqual(self.present(user), files)
        self.assertEqual(len(self.listing(user)), 4)

    # another program at work

    def test_message_removed_mid_session(self) -> None:
        """A message file removed by another program: RETR of it -ERR, the session goes on, QUIT works."""
        user = "gone"
        before = self.listing(user)
        c = self.session(user)
        victim = self.world.users[user].messages[2]
        os.unlink(os.path.join(self.world.maildir(user), disk_bases(self.world.maildir(user))[victim.base]))
        r = c.command(b"RETR 3")
        self.assertTrue(r.startswith(b"-ERR [SYS/TEMP]"), r)
        self.assertTrue(c.command(b"TOP 3 0").startswith(b"-ERR"))
        self.assertEqual(self.retr(c, 2), self.original(user, 2))
        self.assertEqual(self.retr(c, 4), self.original(user, 4))
        self.assertEqual(uidl_listing(c), before)  # the listing is frozen for the session
        self.assertTrue(c.command(b"DELE 3").startswith(b"+OK"))
        self.assertTrue(c.command(b"DELE 5").startswith(b"+OK"))
        self.assertTrue(c.quit().startswith(b"+OK"))
        after = self.listing(user)
        self.assertEqual(sorted(after.values()), sorted(before[n] for n in (1, 2, 4)))
        self.assert_index_matches_disk(user)

    def test_message_renamed_mid_session(self) -> None:
        """Another program changes a message's flags (renames it): RETR and DELE still find it."""
        user = "renamed"
        before = self.listing(user)
        c = self.session(user)
        d = self.world.maildir(user)
        for m in self.world.users[user].messages[1:3]:
            rel = disk_bases(d)[m.base]
            os.rename(os.path.join(d, rel), os.path.join(d, "cur", m.base + ":2,RS"))
        self.assertEqual(self.retr(c, 2), self.original(user, 2))
        self.assertTrue(c.command(b"DELE 3").startswith(b"+OK"))
        self.assertTrue(c.quit().startswith(b"+OK"))
        after = self.listing(user)
        self.assertEqual(sorted(after.values()), sorted(u for n, u in before.items() if n != 3))

    # what a killed server leaves behind

    def test_index_temp_file_left_by_a_killed_server_is_removed(self) -> None:
        """
        A server killed while it writes C{popservice-uidlist} leaves its
        C{popservice-uidlist.tmp.PID.N} (a copy of the index: 21 of 150 kills
        in C{bench/kill_trials.py}), and nothing ever removes it.  One two
        days old must be gone after the next index write, as C{tmp/}
        leftovers of deliveries are after 36 hours.
        """
        user = "stale"
        self.listing(user)
        maildir = self.world.maildir(user)
        leftover = os.path.join(maildir, INDEX_FILE_NAME + ".tmp.999999.1")
        shutil.copyfile(os.path.join(maildir, INDEX_FILE_NAME), leftover)
        old = time.time() - 2 * 86400
        os.utime(leftover, (old, old))
        self.assertEqual(self.world.deliver(user, new_message(user, 1200)), 0)
        self.assertEqual(len(self.listing(user)), 4)  # the index was written
        c = self.session(user)
        self.assertTrue(c.command(b"DELE 1").startswith(b"+OK"))
        self.assertTrue(c.quit().startswith(b"+OK"))  # and once more
        self.assertFalse(os.path.exists(leftover), "a crash's temporary index file is still there")


    # deliveries racing sessions

    def test_delivery_during_session(self) -> None:
        """Mail delivered while a session is open: the session does not show it, the next login does."""
        user = "race"
        before = self.listing(user)
        c = self.session(user)
        self.assertEqual(uidl_listing(c), before)
        stat = c.command(b"STAT")
        for i in range(3):
            self.assertEqual(self.world.deliver(user, new_message(user, 800 + i)), 0)
        self.assertEqual(c.command(b"STAT"), stat)
        self.assertEqual(uidl_listing(c), before)
        self.assertTrue(c.command(b"LIST 6").startswith(b"-ERR"))
        self.assertEqual(self.retr(c, 5), self.original(user, 5))
        self.assertTrue(c.command(b"DELE 1").startswith(b"+OK"))
        self.assertTrue(c.quit().startswith(b"+OK"))
        c = self.session(user)
        after = uidl_listing(c)
        self.assertEqual(len(after), 4 + 3)
        self.assertEqual([after[n] for n in range(1, 5)], [before[n] for n in range(2, 6)])
        self.assertNotIn(before[1], after.values())
        ids = [message_id(self.retr(c, n)) for n in (5, 6, 7)]
        self.assertEqual(ids, ["<race.%d@delivered.popservice>" % (800 + i) for i in range(3)])
        self.assertTrue(c.quit().startswith(b"+OK"))
        self.assert_index_matches_disk(user)

    def test_deliveries_racing_logins(self) -> None:
        """Deliveries in a loop while sessions log in and out: every message shows, no UIDL ever changes."""
        user = "racelogin"
        seen: dict[str, str] = {}  # UIDL -> Message-ID
        delivered: list[int] = []
        errors: list[str] = []
        stop = threading.Event()

        def deliver() -> None:
            for i in range(12):
                if stop.is_set():
                    return
                status = self.world.deliver(user, new_message(user, 1000 + i))
                if status != 0:
                    errors.append("delivery %d exited %d" % (i, status))
                delivered.append(1000 + i)

        t = threading.Thread(target=deliver, daemon=True)
        t.start()
        self.addCleanup(stop.set)
        deadline = time.monotonic() + 60
        sessions = 0
        while (t.is_alive() or sessions < 3) and time.monotonic() < deadline:
            c = self.session(user)
            listing = uidl_listing(c)
            for n, u in listing.items():
                if u not in seen:
                    status, head = c.multi(b"TOP %d 0" % n)
                    self.assertTrue(status.startswith(b"+OK"), status)
                    seen[u] = message_id(head) or ""
            self.assertTrue(c.quit().startswith(b"+OK"))
            sessions += 1
        t.join(30)
        self.assertFalse(t.is_alive())
        self.assertEqual(errors, [])
        c = self.session(user)
        final = uidl_listing(c)
        for n, u in final.items():
            status, head = c.multi(b"TOP %d 0" % n)
            self.assertEqual(seen.setdefault(u, message_id(head) or ""), message_id(head))
        c.quit()
        ids = sorted(seen[u] for u in final.values())
        expected = ["<racelogin.%d@interop.popservice>" % i for i in range(1, 4)]
        expected += ["<racelogin.%d@delivered.popservice>" % i for i in delivered]
        self.assertEqual(ids, sorted(expected))
        self.assertEqual(len(set(seen.values())), len(seen), "a message was shown under two UIDLs")
