"""
The load generator (bench/load.py), its fixture (bench/fixture.py) and its
runner (bench/run.py), run as a user runs them: short smoke runs against a
real C{twistd -n pop3} on loopback, so the tools cannot silently rot.  No
figure is asserted beyond "sessions completed, no errors, the fields there".
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial import unittest

from tests.test_logs import TWISTD, wait_port
from tests.test_tap import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
#: what bench/run.py --quick makes, so that its test reuses this fixture
SMALL = ["--users", "4", "--idle", "3", "--bigbox", "200", "--big-mib", "2"]
SESSION_FIELDS = {"scenario", "tls", "concurrency", "pipeline", "sessions", "sessions_in_window",
                  "sessions_per_s", "n", "p50_ms", "p99_ms", "max_ms", "errors", "error_kinds",
                  "received_bytes", "gen_cpu_s", "gen_busiest", "server_cpu_s", "server_cpu_ms_per_session",
                  "server_peak_rss_kib", "target"}


_fixture: list[str] = []


def fixture() -> str:
    """bench/fixture.py's fixture, small, made once per test process (the tests only read it)."""
    if not _fixture:
        root = tempfile.mkdtemp(prefix="bench-load-", dir=os.getcwd())
        made = bench("fixture.py", root, "--force", *SMALL)
        if made.returncode != 0:
            raise AssertionError(made.stderr)
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _fixture.append(root)
    return _fixture[0]


def bench(script: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


class Generator(unittest.TestCase):
    """bench/load.py against a twistd pop3 serving bench/fixture.py's Maildirs."""

    def setUp(self) -> None:
        self.root = fixture()
        self.port, self.tls_port = free_port(), free_port()
        cert, key = os.path.join(self.root, "tls", "cert.pem"), os.path.join(self.root, "tls", "key.pem")
        self.server = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-l", os.path.abspath(self.mktemp()), "pop3",
             "--mail", "maildir:%s/mail/%%u" % self.root,
             "--auth", "passwd-file:%s/passwd-plain" % self.root, "--failure-delay", "0",
             "--listen", "tcp:%d:interface=127.0.0.1" % self.port,
             "--listen", "ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1" % (self.tls_port, key, cert),
             "--tls-certificate", cert, "--tls-key", key])
        self.addCleanup(self.stop)
        wait_port(self.port, self.server)
        wait_port(self.tls_port, self.server)

    def stop(self) -> None:
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(30)

    def load(self, *argv: str, status: int = 0) -> list[dict[str, Any]]:
        done = bench("load.py", *argv, "--json", "--port", str(self.port), "--tls-port", str(self.tls_port),
                     "--server-pid", str(self.server.pid))
        self.assertEqual(done.returncode, status, done.stdout + done.stderr)
        results: list[dict[str, Any]] = json.loads(done.stdout)
        return results

    def assertClean(self, result: dict[str, Any]) -> None:
        self.assertEqual((result["errors"], result["error_kinds"]), (0, {}), result)
        self.assertGreater(result["sessions"], 0, result)
        self.assertLessEqual(SESSION_FIELDS, set(result), result)
        self.assertGreater(result["server_cpu_s"], 0, result)

    def test_sessions_plain_and_pipelined(self) -> None:
        (plain,) = self.load("sessions", "-c", "2", "-d", "1", "--retr", "2")
        self.assertClean(plain)
        self.assertEqual((plain["scenario"], plain["tls"], plain["concurrency"], plain["pipeline"]),
                         ("sessions", "plain", 2, False))
        # two 4 KiB messages and a UIDL listing per session, counted on the wire
        self.assertGreater(plain["received_bytes"], plain["sessions"] * 2 * 4096)
        (pipelined,) = self.load("sessions", "-c", "2", "-d", "1", "--pipeline")
        self.assertClean(pipelined)
        self.assertEqual((pipelined["pipeline_asked"], pipelined["pipeline"]), (True, True))

    def test_tls_implicit_and_stls(self) -> None:
        implicit, stls = self.load("tls", "-c", "2", "-d", "1", "--mode", "both")
        for result, mode, port in ((implicit, "implicit", self.tls_port), (stls, "stls", self.port)):
            self.assertClean(result)
            self.assertEqual((result["tls"], result["target"]), (mode, "127.0.0.1:%d" % port))

    def test_errors_are_counted_not_hidden(self) -> None:
        (result,) = self.load("login", "-c", "2", "-d", "1", "--password", "wrong", status=1)
        self.assertEqual(result["logins"], 0)
        self.assertGreater(result["errors"], 0)
        self.assertEqual(sum(result["error_kinds"].values()), result["errors"])
        self.assertTrue(all(kind.startswith("-ERR PASS: ") for kind in result["error_kinds"]), result)

    def test_bigretr_and_idle(self) -> None:
        (big,) = self.load("bigretr", "--repeat", "1")
        self.assertEqual(big["errors"], 0, big)
        self.assertGreater(big["body_bytes"], 1 << 20)
        self.assertGreater(big["MBps_median"], 0)
        self.assertIn("server_peak_rss_kib", big)
        (idle,) = self.load("idle", "-n", "2", "--fresh", "1")
        self.assertEqual((idle["errors"], idle["opened"], idle["noop_answered"], idle["fresh_session_n"]),
                         (0, 2, "2/2", 1), idle)
        self.assertLessEqual({"rss_per_conn_kib", "pss_per_conn_kib", "rss_held_kib", "pss_held_kib"},
                             set(idle))


class Runner(unittest.TestCase):
    def test_quick_run(self) -> None:
        """bench/run.py takes the fixture, starts its server, runs load.py, prints every row."""
        done = bench("run.py", "--quick", "--json", "--fixture", fixture(),
                     "--scenarios", "sessions,latency-cold")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        rows = json.loads(done.stdout)
        self.assertEqual([r["row"] for r in rows], ["sessions C=2", "latency under cold bigbox"])
        for row in rows:
            self.assertEqual(row["errors"], 0, row)
        latency = rows[1]
        self.assertGreater(latency["alone_n"], 0, latency)
        self.assertGreater(latency["bg_cold_maildir_ops"], 0, latency)
        self.assertTrue(latency["bg_cold_maildir_recooled"])
        # the table, on stderr as rows come, names every row
        self.assertIn("latency under cold bigbox", done.stderr)


class Instructions(unittest.TestCase):
    """bench/instructions.py: a real twistd pop3 under valgrind's callgrind, a short counted load."""

    def test_instructions_per_session(self) -> None:
        if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
            raise unittest.SkipTest("valgrind is not installed (apt-get install valgrind)")
        root = fixture()
        port = free_port()
        done = bench("instructions.py", "--port", str(port), "--scenario", "sessions", "-c", "2",
                     "-d", "2", "--warmup", "1", "--retr", "1", "--", TWISTD, "-n", "--pidfile=",
                     "-l", os.path.abspath(self.mktemp()), "pop3", "--mail", "maildir:%s/mail/%%u" % root,
                     "--auth", "passwd-file:%s/passwd-plain" % root, "--failure-delay", "0",
                     "--listen", "tcp:%d:interface=127.0.0.1" % port, timeout=600)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        result = json.loads(done.stdout)
        self.assertGreater(result["sessions"], 0, result)
        # a session costs millions of instructions; the count is the dump's, divided by the sessions
        self.assertGreater(result["instructions_per_session"], 100_000, result)
        per_session = round(result["instructions"] / result["sessions"])
        self.assertEqual(result["instructions_per_session"], per_session)
