"""
A private PostgreSQL server for the tests: its own data directory, a free
loopback port, trust authentication, fsync off; started on first use (one per
test process) and stopped at exit.  PostgreSQL refuses to run as root, so when
the tests run as root the server runs as the C{postgres} user (Debian's
package creates it) or C{nobody}.  Each test gets a fresh database at the
current schema (L{fresh_database}).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
PG_BIN = os.path.dirname(_BIN[-1]) if _BIN else None

try:
    import psycopg
except ImportError:  # pragma: no cover - the test extra installs it
    psycopg = None  # type: ignore[assignment]

SKIP = (None if PG_BIN and psycopg is not None
        else "PostgreSQL server binaries (Debian package postgresql) and psycopg are needed")

_counter = itertools.count(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    def __init__(self) -> None:
        assert PG_BIN
        self.root = tempfile.mkdtemp(prefix="popservice-pg-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "postgres.log")
        self.port = 0
        self.user: str | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    pwd.getpwnam(name)
                except KeyError:
                    continue
                self.user = name
                break

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120, cwd=self.root)

    def start(self) -> None:
        os.makedirs(self.data)
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.data):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        init = self._run(os.path.join(PG_BIN or "", "initdb"), "-D", self.data, "-A", "trust", "-U",
                         "popservice", "--no-sync", "-E", "UTF8", "--locale", "C")
        if init.returncode:
            raise RuntimeError("initdb failed: %s" % (init.stdout + init.stderr,))
        for _attempt in range(3):
            self.port = _free_port()
            options = ("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                       "-c full_page_writes=off -c max_connections=200" % (self.port, self.root))
            started = self._run(os.path.join(PG_BIN or "", "pg_ctl"), "-D", self.data, "-l", self.log,
                                "-o", options, "-w", "-t", "60", "start")
            if started.returncode == 0:
                break
        else:
            raise RuntimeError("PostgreSQL did not start: %s\n%s" % (started.stdout + started.stderr,
                                                                      self.log_tail()))

    def log_tail(self) -> str:
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return "postgresql://popservice@127.0.0.1:%d/%s" % (self.port, database)

    def stop(self) -> None:
        if self.port:
            self._run(os.path.join(PG_BIN or "", "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
            self.port = 0
        shutil.rmtree(self.root, ignore_errors=True)


_server: PostgresServer | None = None


def server() -> PostgresServer:
    """The test process's PostgreSQL, started on first use."""
    global _server
    if _server is None:
        candidate = PostgresServer()
        try:
            candidate.start()
        except BaseException:
            candidate.stop()
            raise
        _server = candidate
        atexit.register(candidate.stop)
    return _server


def fresh_database(upgrade: bool = True) -> str:
    """A new, empty database (at the current schema unless C{upgrade} is false); its URL."""
    srv = server()
    name = "test_%d_%d_%d" % (os.getpid(), int(time.time() * 1000) % 100000000, next(_counter))
    with psycopg.connect(srv.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE %s" % (name,))
    url = srv.url(name)
    if upgrade:
        from popservice.database import schema

        with psycopg.connect(url) as conn:
            schema.upgrade(conn)
    return url
