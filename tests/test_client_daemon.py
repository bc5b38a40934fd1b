"""
`popservice fetch --config FILE --daemon INTERVAL`.

The scheduler (popservice.client.daemon.Daemon) on a fake clock with a fake
poll: intervals, jittered exponential backoff reset by a success, at most
--max-parallel polls and never two of one account at once, SIGTERM's
graceful stop, SIGHUP's re-read.  Then the real daemon as a process, against
the private Dovecot and popservice's own POP3 server (in-process, over a
MemoryStore), with short intervals (0.2 s): the failing account backs off
while the others carry on, new mail arrives once, SIGHUP adds and removes
accounts, SIGTERM exits 0 after the current batch, and SIGKILL in mid-batch
followed by a restart loses and duplicates nothing (counted by Message-ID).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from popservice.client.accounts import DEFAULTS, Account, Outcome
from popservice.client.cli_common import EX_FAIL, EX_OK, EX_TEMPFAIL
from popservice.client.daemon import Daemon
from popservice.client.delivery import FetchResult
from popservice.stores.memory import MemoryStore
from tests import dovecot_fixture as fx
from tests.support import ServerMixin, make_factory, memory_checker
from tests.test_client_accounts import cli_env, ids, maildir_ids, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def account(name: str, **settings: Any) -> Account:
    return Account(name, {**DEFAULTS, "url": f"pop3://{name}@127.0.0.1:110", "to": "maildir:/nowhere",
                          "password_env": "X", **settings})


class FakePolls:
    """A poll function: each poll lasts C{duration[name]} clock seconds and ends with C{status[name]}."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.duration: dict[str, float] = {}
        self.status: dict[str, int] = {}
        self.started: list[tuple[float, str]] = []
        self.running: set[str] = set()
        self.most_at_once = 0
        self.stop_seen: dict[str, bool] = {}

    def __call__(self, reactor: Any, acct: Account, stop: Callable[[], bool]) -> Any:
        name = acct.name
        assert name not in self.running, f"{name} polled twice at once"
        self.running.add(name)
        self.most_at_once = max(self.most_at_once, len(self.running))
        self.started.append((self.clock.seconds(), name))
        d: defer.Deferred[Outcome] = defer.Deferred()

        def end() -> None:
            self.running.discard(name)
            self.stop_seen[name] = stop()
            result = FetchResult()
            result.fetched = 1
            d.callback(Outcome(name, self.status.get(name, EX_OK), result=result))

        self.clock.callLater(self.duration.get(name, 0.0), end)
        return d

    def starts(self, name: str) -> list[float]:
        return [round(t, 6) for t, n in self.started if n == name]


class SchedulerTests(unittest.TestCase):
    def make(self, accounts: list[Account], interval: float = 10.0, max_parallel: int = 4,
             rand: float = 0.5, status: dict[str, int] | None = None,
             duration: dict[str, float] | None = None, **kw: Any) -> tuple[Daemon, FakePolls, task.Clock]:
        clock = task.Clock()
        polls = FakePolls(clock)
        polls.status.update(status or {})
        polls.duration.update(duration or {})
        self.loaded = {a.name: a for a in accounts}
        daemon = Daemon(clock, lambda strict: dict(self.loaded), interval, max_parallel, poll=polls,
                        rand=lambda: rand, install_signals=False, **kw)
        self.done = daemon.run(dict(self.loaded))
        clock.advance(0)  # the first polls: at once
        return daemon, polls, clock

    def test_intervals_backoff_and_reset(self) -> None:
        daemon, polls, clock = self.make([account("good"), account("bad"), account("fast", interval=3.0)],
                                         max_backoff=100.0, status={"bad": EX_FAIL})
        clock.pump([0.5] * 500)  # 250 s
        self.assertEqual(polls.starts("good")[:4], [0, 10, 20, 30])
        self.assertEqual(polls.starts("fast")[:4], [0, 3, 6, 9])
        # 10 * 2**n after n failures in a row (the jitter factor is 1 here), capped at 100
        self.assertEqual(polls.starts("bad")[:5], [0, 20, 60, 140, 240])
        polls.status["bad"] = EX_OK
        before = len(polls.starts("bad"))
        clock.pump([0.5] * 400)
        after = polls.starts("bad")[before:]
        self.assertEqual([b - a for a, b in zip(after, after[1:], strict=False)][:3], [10, 10, 10])  # reset

    def test_jitter(self) -> None:
        for rand, factor in ((0.0, 0.8), (0.999999, 1.2)):
            daemon, polls, clock = self.make([account("bad")], rand=rand, status={"bad": EX_TEMPFAIL})
            clock.pump([0.01] * 10000)  # 100 s
            starts = polls.starts("bad")
            # (the clock moves 0.01 s a step)
            self.assertLess(abs(starts[1] - 20 * factor), 0.02, starts)
            self.assertLess(abs(starts[2] - starts[1] - 40 * factor), 0.02, starts)
            daemon.stop()

    def test_backoff_never_below_the_interval(self) -> None:
        daemon, polls, clock = self.make([account("bad", interval=500.0)], max_backoff=60.0,
                                         status={"bad": EX_FAIL})
        clock.pump([1.0] * 1200)
        self.assertEqual(polls.starts("bad"), [0, 500, 1000])

    def test_max_parallel_and_one_poll_per_account(self) -> None:
        accounts = [account(f"a{i}") for i in range(6)]
        daemon, polls, clock = self.make(accounts, interval=1.0, max_parallel=2,
                                         duration={a.name: 5.0 for a in accounts})
        clock.pump([0.25] * 200)  # 50 s
        self.assertEqual(polls.most_at_once, 2)
        for a in accounts:  # each polled, none twice at once (FakePolls asserts), in turn
            starts = polls.starts(a.name)
            self.assertGreaterEqual(len(starts), 2)
            self.assertTrue(all(b - a_ >= 6 for a_, b in zip(starts, starts[1:], strict=False)), starts)
        self.assertEqual([n for _, n in polls.started[:6]], [a.name for a in accounts])

    def test_stop_lets_running_polls_finish(self) -> None:
        daemon, polls, clock = self.make([account("a"), account("b"), account("c")], max_parallel=2,
                                         duration={"a": 5.0, "b": 8.0, "c": 1.0})
        clock.advance(1)
        daemon.stop()
        self.assertFalse(self.done.called)
        clock.advance(4)
        self.assertFalse(self.done.called)  # b still runs
        clock.advance(3)
        self.assertEqual(self.successResultOf(self.done), EX_OK)
        self.assertEqual(polls.stop_seen, {"a": True, "b": True})  # told to send no more RETRs
        self.assertEqual(sorted(n for _, n in polls.started), ["a", "b"])  # c waited for a slot: never ran
        clock.advance(100)
        self.assertEqual(len(polls.started), 2)

    def test_second_stop_exits_at_once(self) -> None:
        daemon, polls, clock = self.make([account("a")], duration={"a": 50.0})
        clock.advance(1)
        daemon.stop()
        daemon.stop()
        self.assertEqual(self.successResultOf(self.done), EX_TEMPFAIL)

    def test_reload(self) -> None:
        daemon, polls, clock = self.make([account("a"), account("b"), account("c")], duration={"b": 3.0})
        clock.advance(1)  # b is polling
        self.loaded = {"a": account("a", interval=2.0), "c": account("c"), "d": account("d")}
        daemon.reload()
        clock.advance(0)
        self.assertEqual(polls.starts("d"), [1])  # new: at once
        clock.pump([0.5] * 40)  # to 21 s
        self.assertEqual(polls.starts("b"), [0])  # removed: its poll finished, no other
        self.assertNotIn("b", daemon.slots)
        self.assertEqual(polls.starts("a"), [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20])  # changed interval
        self.assertEqual(polls.starts("c"), [0, 10, 20])
        # a file that does not load leaves everything as it was
        self.loaded = {}

        def broken(strict: bool) -> dict[str, Account]:
            raise ValueError("bad file")

        daemon.load = broken
        daemon.reload()
        self.assertEqual(sorted(daemon.slots), ["a", "c", "d"])
        daemon.stop()
        self.assertEqual(self.successResultOf(self.done), EX_OK)


# --------------------------------------------------------------------------
# The daemon as a process

_FIELD = re.compile(r"(\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)")


def events(path: str) -> list[dict[str, Any]]:
    """The daemon's log events (its C{popservice.fetch} lines), with C{at}: their time."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            if "[popservice.fetch#" not in line:
                continue
            fields: dict[str, Any] = dict(_FIELD.findall(line.split("] ", 1)[1]))
            m = _STAMP.match(line)
            fields["at"] = time.mktime(time.strptime(m.group(1).split(".")[0], "%Y-%m-%dT%H:%M:%S")) + float(
                "0." + m.group(1).split(".")[1]) if m else 0.0
            out.append(fields)
    return out


@defer.inlineCallbacks
def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out ({timeout} s) waiting for {what}")
        yield task.deferLater(reactor, 0.05, lambda: None)


class DaemonProcessBase(ServerMixin, unittest.TestCase):
    skip = fx.skip_reason()

    def setUp(self) -> None:
        self.dovecot = fx.get_dovecot()
        self.tmp = tempfile.mkdtemp(prefix="popservice-daemon-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.own = MemoryStore({})
        self.own_port = self.listen(make_factory(self.own, [memory_checker(carol="carol pw", dave="dave pw",
                                                                           frank="frank pw")]))
        self.config = os.path.join(self.tmp, "accounts.toml")
        self.log = os.path.join(self.tmp, "daemon.log")
        self.env = cli_env(**{f"PW_{u.upper()}": pw for u, pw in fx.USERS.items()})
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self._kill_all)

    def _kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def dovecot_account(self, user: str, **kw: Any) -> dict[str, Any]:
        return {"url": f"pop3://{user}@127.0.0.1:{self.dovecot.port}", "password_env": f"PW_{user.upper()}",
                "to": f"maildir:mail/{user}", "state_dir": f"state/{user}", **kw}

    def own_account(self, user: str, password: str, **kw: Any) -> dict[str, Any]:
        return {"url": f"pop3://{user}@127.0.0.1:{self.own_port}", "password_command": f"echo '{password}'",
                "to": f"maildir:mail/{user}", "state_dir": f"state/{user}", **kw}

    def write(self, accounts: dict[str, dict[str, Any]]) -> None:
        write_config(self.config, accounts, defaults={"starttls": "none", "allow_plaintext": True})

    def start(self, *extra: str, interval: str = "0.2") -> subprocess.Popen[bytes]:
        log = open(self.log, "ab")
        self.addCleanup(log.close)
        argv = [sys.executable, "-m", "popservice.client.cli", "fetch", "--config", self.config,
                "--daemon", interval, *extra]
        proc = subprocess.Popen(argv, env=self.env, cwd=ROOT, stderr=log, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def events(self, event: str | None = None, account: str | None = None) -> list[dict[str, Any]]:
        return [e for e in events(self.log) if (event is None or e.get("event") == event)
                and (account is None or e.get("account") == account)]

    def mail(self, user: str) -> list[str]:
        return maildir_ids(os.path.join(self.tmp, "mail", user))

    def dovecot_count(self, user: str) -> int:
        md = self.dovecot.maildir(user)
        return sum(len(os.listdir(os.path.join(md, sub))) for sub in ("cur", "new"))

    def deliver_to_dovecot(self, user: str, content: bytes, n: int) -> None:
        path = os.path.join(self.dovecot.maildir(user), "new", f"{1800000000 + n}.M{n}P1.later")
        with open(path + ".tmp", "wb") as f:
            f.write(content)
        os.chown(path + ".tmp", self.dovecot.uid, self.dovecot.gid)
        os.rename(path + ".tmp", path)

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-4000:]

    @defer.inlineCallbacks
    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> Any:
        proc.send_signal(signal.SIGTERM)
        yield wait_until(lambda: proc.poll() is not None, timeout, "the daemon to exit after SIGTERM")
        return proc.returncode


class DaemonProcess(DaemonProcessBase):
    @defer.inlineCallbacks
    def test_polls_backoff_new_mail_and_sighup(self) -> Any:
        dove = fx.bulk_messages("deleting", 20, 2000)
        kept = fx.bulk_messages("keeper", 6, 1000)
        own = [fx.message("carol", i, b"own %d\n" % i) for i in range(1, 11)]
        self.dovecot.set_mailbox("deleting", fx.USERS["deleting"], dove)
        self.dovecot.set_mailbox("keeper", fx.USERS["keeper"], kept)
        self.own.messages.update(carol=list(own), dave=[fx.message("dave", 1, b"x\n")],
                                 frank=[fx.message("frank", 1, b"frank's\n")])
        accounts = {
            "dove": self.dovecot_account("deleting", batch=8),
            "keep": self.dovecot_account("keeper", keep=True,
                                         url=f"pop3s://keeper@127.0.0.1:{self.dovecot.tls_port}",
                                         ca_file=self.dovecot.cert),
            "own": self.own_account("carol", "carol pw"),
            "wrong": self.own_account("dave", "wrong pw"),
        }
        self.write(accounts)
        proc = self.start()
        # every good account polls again and again; the failing one backs off
        yield wait_until(lambda: all(len(self.events("poll_ok", a)) >= 3 for a in ("dove", "keep", "own")),
                         30, "three polls of each good account")
        self.assertEqual(self.mail("deleting"), ids(dove))
        self.assertEqual(self.mail("keeper"), ids(kept))
        self.assertEqual(self.mail("carol"), ids(own))
        # new mail between polls: it arrives, once
        later_dove = fx.message("deleting", 100, b"later\n")
        later_own = fx.message("carol", 100, b"later\n")
        self.deliver_to_dovecot("deleting", later_dove, 1)
        self.own.messages["carol"].append(later_own)
        yield wait_until(lambda: len(self.mail("deleting")) == 21 and len(self.mail("carol")) == 11,
                         30, "the new mail")
        yield wait_until(lambda: len(self.events("poll_failed", "wrong")) >= 4, 30, "four failed polls")
        polls = len(self.events("poll_ok", "own"))
        yield wait_until(lambda: len(self.events("poll_ok", "own")) >= polls + 3, 30, "three more polls")
        self.assertEqual(self.mail("deleting"), ids(dove + [later_dove]))
        self.assertEqual(self.mail("carol"), ids(own + [later_own]))
        self.assertEqual(self.mail("keeper"), ids(kept))
        self.assertEqual((self.dovecot_count("deleting"), self.dovecot_count("keeper")), (0, 6))
        self.assertEqual(self.own.messages["carol"], [])
        # the failing account's polls spread out: 0.2 * 2**n, +-20 %
        backoffs = self.events("backoff", "wrong")
        for n, e in enumerate(backoffs[:4], start=1):
            self.assertEqual(int(e["failures"]), n)
            self.assertTrue(0.8 * 0.2 * 2 ** n <= float(e["delay"]) <= 1.2 * 0.2 * 2 ** n, e)
        failed = [e["at"] for e in self.events("poll_failed", "wrong")]
        gaps = [b - a for a, b in zip(failed, failed[1:], strict=False)]
        self.assertTrue(all(b > a for a, b in zip(gaps, gaps[1:], strict=False)), gaps)
        good = [e["at"] for e in self.events("poll_ok", "own")]
        self.assertGreater(len(good), 2 * len(failed), (len(good), len(failed)))
        self.assertTrue(all(b - a < 1.5 for a, b in zip(good, good[1:], strict=False)), good)
        self.assertIn("'authentication failed", self.events("poll_failed", "wrong")[0]["error"])
        # SIGHUP: frank comes, wrong goes
        accounts["frank"] = self.own_account("frank", "frank pw")
        del accounts["wrong"]
        self.write(accounts)
        proc.send_signal(signal.SIGHUP)
        yield wait_until(lambda: self.events("poll_ok", "frank"), 30, "the new account's first poll")
        self.assertTrue(self.events("account_removed", "wrong"))
        self.assertEqual(self.mail("frank"), ids([fx.message("frank", 1, b"frank's\n")]))
        stopped_failing = len(self.events("poll_failed", "wrong"))
        polls = len(self.events("poll_ok", "frank"))
        yield wait_until(lambda: len(self.events("poll_ok", "frank")) >= polls + 3, 30, "more polls of frank")
        self.assertLessEqual(len(self.events("poll_failed", "wrong")), stopped_failing + 1)  # one under way
        # a broken file is reported; the accounts run on
        with open(self.config, "a") as f:
            f.write("[accounts.broken\n")
        proc.send_signal(signal.SIGHUP)
        yield wait_until(lambda: self.events("reload_failed"), 30, "the failed reload")
        rc = yield self.stop(proc)
        self.assertEqual(rc, 0, self.log_text())
        self.assertEqual(self.events()[-1]["event"], "stopped")
        self.assertEqual(self.mail("deleting"), ids(dove + [later_dove]))

    @defer.inlineCallbacks
    def test_sigterm_exits_0_after_the_current_batch(self) -> Any:
        total = 1000
        msgs = fx.bulk_messages("bulk", total, 2000)
        self.dovecot.set_mailbox("bulk", fx.USERS["bulk"], msgs)
        self.write({"bulk": self.dovecot_account("bulk", batch=16)})
        proc = self.start("--max-parallel", "1", interval="1h")
        new = os.path.join(self.tmp, "mail", "bulk", "new")
        yield wait_until(lambda: os.path.isdir(new) and len(os.listdir(new)) >= 32, 60, "the first batches")
        t0 = time.monotonic()
        rc = yield self.stop(proc)
        self.assertEqual(rc, 0, self.log_text())
        self.assertLess(time.monotonic() - t0, 15)
        (ok,) = self.events("poll_ok", "bulk")
        fetched = int(ok["fetched"])
        self.assertEqual(ok["stopped"], "yes", ok)
        self.assertLess(fetched, total)
        self.assertTrue(self.events("stopping"))
        # what it fetched is published, recorded and deleted on the server: nothing half done
        self.assertEqual(len(self.mail("bulk")), fetched)
        self.assertEqual(int(ok["deleted"]), fetched)
        self.assertEqual(self.dovecot_count("bulk"), total - fetched)
        self.assertEqual(os.listdir(os.path.join(self.tmp, "mail", "bulk", "tmp")), [])
        # the next start fetches the rest, once
        proc = self.start(interval="1h")
        yield wait_until(lambda: len(self.events("poll_ok", "bulk")) == 2, 120, "the second poll")
        rc = yield self.stop(proc)
        self.assertEqual(rc, 0, self.log_text())
        self.assertEqual(self.mail("bulk"), ids(msgs))
        self.assertEqual(self.dovecot_count("bulk"), 0)

    @defer.inlineCallbacks
    def test_sigkill_mid_batch_then_restart(self) -> Any:
        """SIGKILL while two accounts fetch (Dovecot and the own server); restart; every message once."""
        rnd = random.Random(int(os.environ.get("POPSERVICE_CRASH_SEED", "77")))
        trials = int(os.environ.get("POPSERVICE_DAEMON_CRASH_TRIALS", "3"))
        dove = fx.bulk_messages("crash", 200, 3000)
        own = [fx.message("carol", i, b"y" * 2000 + b"\n") for i in range(1, 201)]
        new = [os.path.join(self.tmp, "mail", u, "new") for u in ("crash", "carol")]

        def complete() -> bool:
            return len(self.mail("crash")) == len(dove) and len(self.mail("carol")) == len(own)

        # Calibration: how long the fetch goes on once its first messages are seen (a fast machine
        # fetches all 400 in a fraction of a second); the kills land within 0.8 of that.
        self.dovecot.set_mailbox("crash", fx.USERS["crash"], dove)
        self.own.messages["carol"] = list(own)
        self.write({"dove": self.dovecot_account("crash", batch=16, keep=True),
                    "own": self.own_account("carol", "carol pw", batch=16, keep=True)})
        proc = self.start()
        yield wait_until(lambda: any(os.path.isdir(d) and os.listdir(d) for d in new), 60,
                         "the first messages")
        seen = time.monotonic()
        while not complete():
            if time.monotonic() - seen > 120:
                raise AssertionError("the calibration fetch did not finish")
            yield task.deferLater(reactor, 0.002, lambda: None)
        window = max(time.monotonic() - seen, 0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_mid = 0
        for trial in range(trials):
            keep = trial % 2 == 1
            self.dovecot.set_mailbox("crash", fx.USERS["crash"], dove)
            self.own.messages["carol"] = list(own)
            shutil.rmtree(os.path.join(self.tmp, "mail"), ignore_errors=True)
            shutil.rmtree(os.path.join(self.tmp, "state"), ignore_errors=True)
            self.write({"dove": self.dovecot_account("crash", batch=16, keep=keep),
                        "own": self.own_account("carol", "carol pw", batch=16, keep=keep)})
            kills = 2 if trial % 3 == 2 else 1  # sometimes the restart is killed too
            for _ in range(kills):
                proc = self.start()
                yield wait_until(lambda: any(os.path.isdir(d) and os.listdir(d) for d in new), 60,
                                 "the first messages")
                yield task.deferLater(reactor, rnd.uniform(0.0, 0.8 * window), lambda: None)
                killed_mid += not complete()
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            proc = self.start()

            def finished() -> bool:
                fetched = len(self.mail("crash")) >= len(dove) and len(self.mail("carol")) >= len(own)
                deleted = keep or (self.dovecot_count("crash") == 0 and not self.own.messages["carol"])  # noqa: B023
                return fetched and deleted

            yield wait_until(finished, 120, f"trial {trial}: everything after the restart")
            before = len(self.events("poll_ok"))
            yield wait_until(lambda: len(self.events("poll_ok")) >= before + 2, 30, "two more polls")
            rc = yield self.stop(proc)
            self.assertEqual(rc, 0, self.log_text())
            self.assertEqual(self.mail("crash"), ids(dove), f"trial {trial}")
            self.assertEqual(self.mail("carol"), ids(own), f"trial {trial}")
            for user in ("crash", "carol"):
                tmp = os.listdir(os.path.join(self.tmp, "mail", user, "tmp"))
                self.assertEqual(tmp, [], f"trial {trial}")
            self.assertEqual(self.dovecot_count("crash"), len(dove) if keep else 0)
        self.assertGreater(killed_mid, trials // 2)
