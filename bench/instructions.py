#!/usr/bin/env python3
"""
User-space instructions per POP3 session of a server, counted by valgrind's
callgrind: repeatable (two runs of one tree, 30 s each, differed by 0.2 to
3 %: which sessions fall in the window, the collector's timing), where CPU
time on a shared machine moves by 20 %.  Kernel time is not
counted: count system calls per session with C{strace -c -f -p PID} beside it.

The server command runs under C{valgrind --tool=callgrind} (about 50 times
slower); once it answers, C{bench/load.py} warms it up, the counters are
zeroed (C{callgrind_control -z}), the load runs for C{--duration} seconds, the
counters are dumped (C{-d}) and divided by the sessions the load completed.

    python3 bench/instructions.py --port 27110 --tls-port 27995 --scenario sessions -- \\
        twistd -n --pidfile= pop3 --mail maildir:/tmp/fx/mail/%u --auth passwd-file:/tmp/fx/passwd \\
        --listen tcp:27110:interface=127.0.0.1 \\
        --listen ssl:27995:privateKey=/tmp/fx/tls/key.pem:certKey=/tmp/fx/tls/cert.pem:interface=127.0.0.1

Any POP3 server started by a command line works the same (the yardstick's
twisted.mail anchor, for instance), so two servers compare as a ratio of
instructions.  Needs valgrind (C{apt-get install valgrind}).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from run import wait_port  # bench/run.py (a script's own directory is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))


def run_load(args: argparse.Namespace, duration: float) -> dict[str, object]:
    cmd = [sys.executable, os.path.join(HERE, "load.py"), args.scenario, "--port", str(args.port),
           "--tls-port", str(args.tls_port), "-c", str(args.concurrency), "-d", str(duration),
           "--user", args.user, "--password", args.password, "--retr", str(args.retr), "--procs", "1",
           "--timeout", "600", "--json"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    try:
        results = json.loads(out.stdout)
    except ValueError:
        raise SystemExit("load.py failed: %s%s" % (out.stdout[-500:], out.stderr[-500:])) from None
    result: dict[str, object] = results[0] if isinstance(results, list) else results
    return result


def callgrind_summary(directory: str, pid: int, before: set[str]) -> int:
    """The instruction count of the newest dump of C{pid} in C{directory}."""
    for _ in range(600):
        dumps = set(glob.glob(os.path.join(directory, "cg.%d.*" % pid))) - before
        for path in dumps:
            with open(path) as f:
                for line in f:
                    if line.startswith("summary:"):
                        return int(line.split()[1])
        time.sleep(0.5)
    raise SystemExit("no callgrind dump appeared")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="the server's plain POP3 port")
    ap.add_argument("--tls-port", type=int, default=995)
    ap.add_argument("--scenario", choices=["sessions", "tls", "login"], default="sessions")
    ap.add_argument("-c", "--concurrency", type=int, default=10)
    ap.add_argument("-d", "--duration", type=float, default=30.0, help="seconds of counted load")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before counting")
    ap.add_argument("--user", default="u%d")
    ap.add_argument("--password", default="pw-{user}")
    ap.add_argument("--retr", type=int, default=20, help="messages RETRieved per session")
    ap.add_argument("--keep", help="keep the callgrind files in this directory")
    ap.add_argument("server", nargs=argparse.REMAINDER, help="-- then the server's command line")
    args = ap.parse_args()
    command = args.server[1:] if args.server[:1] == ["--"] else args.server
    if not command:
        ap.error("the server's command line is missing (after --)")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit("%s is not installed (apt-get install valgrind)" % tool)
    directory = args.keep or tempfile.mkdtemp(prefix="instructions-")
    os.makedirs(directory, exist_ok=True)
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=%s/cg.%%p" % directory,
                             *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(args.port, proc, seconds=300.0)  # (valgrind starts the server slowly)
        run_load(args, args.warmup)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, stdout=subprocess.DEVNULL)
        result = run_load(args, args.duration)
        before = set(glob.glob(os.path.join(directory, "cg.%d.*" % proc.pid)))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, stdout=subprocess.DEVNULL)
        instructions = callgrind_summary(directory, proc.pid, before)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    count = int(result.get("sessions") or result.get("logins") or 0)  # type: ignore[call-overload]
    if not count or result.get("errors"):
        raise SystemExit("the load failed: %r" % (result,))
    print(json.dumps({"scenario": args.scenario, "sessions": count, "instructions": instructions,
                      "instructions_per_session": round(instructions / count)}))


if __name__ == "__main__":
    main()
