#!/usr/bin/env python3
"""
Run bench/load.py's scenarios against popservice and print one table.

By default it makes (or reuses) the fixture of bench/fixture.py in --fixture,
starts two `twistd -n pop3` on loopback over it, one with the {PLAIN}
passwd-file (plain and STLS on one port, implicit TLS on another) and one
with the {ARGON2ID} passwd-file, runs each scenario as its own load.py
process with --server-pid (so the server's CPU time and memory come from
/proc), and stops them.  With --port it starts nothing and drives the server
already listening there (and --argon2-port, if given, for the argon2 rows;
--server-pid for the server's figures; --fixture for --recool of bigbox).

    .venv/bin/python bench/run.py [--fixture /tmp/popload] [--duration 5] [--scenarios sessions,tls,...]
    .venv/bin/python bench/run.py --port 110 --tls-port 995 --server-pid $(pgrep -o dovecot)
    .venv/bin/python bench/run.py --quick --json     # seconds, for a smoke test

Scenario groups (--scenarios): sessions, pipeline, tls, login, bigretr,
idle, latency-argon2, latency-cold.  The machine running both server and
generator is shared: compare rows of one run, and read "gen busy" (the
busiest generator process's CPU share; near 1.0 means the generator, not the
server, was the limit).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
LOAD = os.path.join(HERE, "load.py")
FIXTURE = os.path.join(HERE, "fixture.py")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
GROUPS = ("sessions", "pipeline", "tls", "login", "bigretr", "idle", "latency-argon2", "latency-cold")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("twistd exited with status %s" % process.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on port %d after %.0f s" % (port, seconds))


@dataclass
class Server:
    """Where a server listens, and its process id when we know it."""

    name: str
    port: int
    tls_port: int | None = None
    host: str = "127.0.0.1"
    pid: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_popservice(name: str, root: str, passwd: str, tls: bool, extra: Sequence[str] = ()) -> Server:
    """`twistd -n pop3` over the fixture in C{root}, on free loopback ports."""
    port = free_port()
    cert, key = os.path.join(root, "tls", "cert.pem"), os.path.join(root, "tls", "key.pem")
    argv = [TWISTD, "-n", "--pidfile=", "-l", os.path.join(root, "twistd-%s.log" % name), "pop3",
            "--mail", "maildir:%s/mail/%%u" % root, "--auth", "passwd-file:%s" % os.path.join(root, passwd),
            "--listen", "tcp:%d:interface=127.0.0.1" % port, *extra]
    tls_port = None
    if tls:
        tls_port = free_port()
        argv += ["--listen", "ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1" % (tls_port, key, cert),
                 "--tls-certificate", cert, "--tls-key", key]
    process = subprocess.Popen(argv, cwd=root, stdin=subprocess.DEVNULL)
    server = Server(name, port, tls_port, "127.0.0.1", process.pid, process)
    try:
        wait_port(port, process)
        if tls_port:
            wait_port(tls_port, process)
    except BaseException:
        server.stop()
        raise
    return server


def load(scenario: str, server: Server, *args: str, python: str = sys.executable) -> list[dict[str, Any]]:
    """One bench/load.py run; its results (errors are in them, whatever the exit status)."""
    argv = [python, LOAD, scenario, "--json", "--host", server.host, "--port", str(server.port), *args]
    if server.tls_port:
        argv += ["--tls-port", str(server.tls_port)]
    if server.pid:
        argv += ["--server-pid", str(server.pid)]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if done.returncode not in (0, 1):
        return [{"scenario": scenario, "errors": 1,
                 "error_kinds": {"load.py exited with %d" % done.returncode: 1}}]
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


@dataclass(frozen=True)
class Plan:
    duration: float
    concurrency: tuple[int, ...]
    tls_concurrency: int
    login_concurrency: int
    bigretr_repeat: int
    idle: int
    argon2_background: int
    latency_duration: float


def plan(options: argparse.Namespace) -> Plan:
    if options.quick:
        return Plan(1.0, (2,), 2, 2, 1, 3, 2, 1.5)
    return Plan(options.duration, (1, 10, 50), 10, 10, 3, options.idle, 50, options.latency_duration)


def run(groups: Sequence[str], p: Plan, plain: Server, argon2: Server | None, recool: str | None,
        rows: list[tuple[str, dict[str, Any]]], restart: Callable[[], Server] | None = None) -> None:
    """
    Every scenario of C{groups}, in order; each result goes into C{rows} as
    it comes.  C{restart}, when we own the plain server, gives a fresh one
    for the idle row (a server that has run the other rows has free heap
    to spare, which would hide what a connection costs).
    """
    d = ["-d", str(p.duration)]

    def add(label: str, results: list[dict[str, Any]]) -> None:
        for r in results:
            name = label if len(results) == 1 else "%s %s" % (label, r.get("tls"))
            rows.append((name, r))
            print(format_row(name, r), file=sys.stderr, flush=True)

    if "sessions" in groups or "pipeline" in groups:
        for c in p.concurrency:
            if "sessions" in groups:
                add("sessions C=%d" % c, load("sessions", plain, "-c", str(c), *d))
            if "pipeline" in groups:
                add("sessions C=%d pipelined" % c, load("sessions", plain, "-c", str(c), "--pipeline", *d))
    if "tls" in groups and plain.tls_port:
        add("tls C=%d" % p.tls_concurrency,
            load("tls", plain, "-c", str(p.tls_concurrency), "--mode", "both", *d))
    if "login" in groups:
        add("login {PLAIN} C=%d" % p.login_concurrency,
            load("login", plain, "-c", str(p.login_concurrency), *d))
        if argon2:
            add("login {ARGON2ID} C=%d" % p.login_concurrency,
                load("login", argon2, "-c", str(p.login_concurrency), *d))
    if "bigretr" in groups:
        add("bigretr", load("bigretr", plain, "--repeat", str(p.bigretr_repeat)))
    if "idle" in groups:
        if restart is not None:
            plain = restart()
        add("idle N=%d" % p.idle, load("idle", plain, "-n", str(p.idle)))
    ld = ["-d", str(p.latency_duration)]
    if "latency-argon2" in groups and argon2:
        # the well-behaved client first with a {PLAIN} password (user light), then an argon2 one
        for who, user in (("{PLAIN} user", "light"), ("{ARGON2ID} user", "u%d")):
            add("latency of a %s under %d argon2 logins" % (who, p.argon2_background),
                load("latency-under", argon2, "--user", user,
                     "--background", "argon2-logins:%d" % p.argon2_background, *ld))
    if "latency-cold" in groups:
        extra = ["--recool-cmd", recool] if recool else []
        add("latency under cold bigbox", load("latency-under", plain, "--background", "cold-maildir:bigbox",
                                              *extra, *ld))


# -- The table -------------------------------------------------------------------------------

COLUMNS = "%-48s %16s %9s %9s %6s %10s %8s  %s"


def _f(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return ("%.1f" % value if value >= 100 else "%.2f" % value) + unit
    return str(value) + unit


def format_row(name: str, r: dict[str, Any]) -> str:
    """One line: rate, latency, errors, server CPU per operation, generator load, the rest."""
    kind = r.get("scenario")
    rate, p50, p99, cpu, notes = "-", r.get("p50_ms"), r.get("p99_ms"), "-", ""
    if kind in ("sessions", "tls"):
        rate = _f(r.get("sessions_per_s"), " sess/s")
        cpu = _f(r.get("server_cpu_ms_per_session"))
    elif kind == "login":
        rate = _f(r.get("logins_per_s"), " logins/s")
        cpu = _f(r.get("server_cpu_ms_per_login"))
    elif kind == "bigretr":
        rate = _f(r.get("MBps_median"), " MB/s")
        notes = "%s MiB body, server peak RSS %s MiB (before %s)" % (
            _f((r.get("body_bytes") or 0) / 2**20), _f((r.get("server_peak_rss_kib") or 0) / 1024),
            _f((r.get("server_rss_before_kib") or 0) / 1024))
    elif kind == "idle":
        p50, p99 = r.get("fresh_session_p50_ms"), r.get("fresh_session_p99_ms")
        notes = "opened %s, RSS %s KiB/conn, PSS %s KiB/conn, NOOP %s (latency: a fresh session)" % (
            r.get("opened"), _f(r.get("rss_per_conn_kib")), _f(r.get("pss_per_conn_kib")),
            r.get("noop_answered"))
    elif kind == "latency-under":
        p50, p99 = r.get("under_p50_ms"), r.get("under_p99_ms")
        bg = {k: v for k, v in r.items() if k.startswith("bg_")}
        per_s = next((v for k, v in bg.items() if k.endswith("_per_s")), None)
        first = next((v for k, v in bg.items() if k.endswith("_first_open_ms")), None)
        bg_errors = {kind: n for k, v in bg.items() if k.endswith("_error_kinds") for kind, n in v.items()}
        notes = "alone p50 %s p99 %s ms (n=%s); under n=%s; background %s/s%s%s" % (
            _f(r.get("alone_p50_ms")), _f(r.get("alone_p99_ms")), r.get("alone_n"), r.get("under_n"),
            _f(per_s), "" if first is None else ", first open %s ms" % _f(first),
            " (background errors: %s)" % bg_errors if bg_errors else "")
    errors = r.get("errors", 0)
    if r.get("error_kinds"):
        notes += " errors: %s" % r["error_kinds"]
    return COLUMNS % (name, rate, _f(p50), _f(p99), errors, cpu, _f(r.get("gen_busiest")), notes)


def table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    head = COLUMNS % ("scenario", "rate", "p50 ms", "p99 ms", "errors", "CPU-ms/op", "gen busy", "notes")
    return "\n".join([head, *(format_row(name, r) for name, r in rows)])


# -- Command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="/tmp/popservice-load",
                        help="fixture directory (made if needed)")
    parser.add_argument("--scenarios", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput row")
    parser.add_argument("--latency-duration", type=float, default=10.0, help="seconds per latency phase")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small fixture, C=2, ~1 s rows")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    parser.add_argument("--port", type=int, help="drive the server on this port instead of starting one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tls-port", type=int)
    parser.add_argument("--argon2-port", type=int, help="an existing server with the argon2 passwd-file")
    parser.add_argument("--server-pid", type=int)
    options = parser.parse_args(argv)
    groups = [g.strip() for g in options.scenarios.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error("unknown scenario groups: %s (known: %s)"
                     % (", ".join(sorted(unknown)), ", ".join(GROUPS)))
    root = os.path.abspath(options.fixture)
    servers: list[Server] = []
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        if options.port:
            plain = Server("existing", options.port, options.tls_port, options.host, options.server_pid)
            argon2 = (Server("existing-argon2", options.argon2_port, host=options.host)
                      if options.argon2_port else None)
        else:
            small = (["--users", "4", "--idle", "3", "--bigbox", "200", "--big-mib", "2"]
                     if options.quick else [])
            subprocess.run([sys.executable, FIXTURE, root, *small], check=True)
            plain = start_popservice("plain", root, "passwd-plain", tls=True)
            servers.append(plain)
            argon2 = None
            if {"login", "latency-argon2"} & set(groups):
                argon2 = start_popservice("argon2", root, "passwd-argon2", tls=False)
                servers.append(argon2)
        recool = None
        if os.path.isdir(os.path.join(root, "mail", "bigbox")):
            recool = shlex.join([sys.executable, FIXTURE, root, "--recool", "bigbox"])
            subprocess.run(shlex.split(recool), check=True)
        def restart() -> Server:
            old = next(s for s in servers if s.name == "plain")
            servers.remove(old)
            old.stop()
            fresh = start_popservice("plain", root, "passwd-plain", tls=True)
            servers.append(fresh)
            return fresh

        run(groups, plan(options), plain, argon2, recool, rows, None if options.port else restart)
    finally:
        for s in servers:
            s.stop()
    if options.json:
        print(json.dumps([{"row": name, **r} for name, r in rows], indent=1))
    else:
        print(table(rows))
    return 1 if any(r.get("errors") for _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
