#!/usr/bin/env python3
"""
Run the fuzz targets under atheris (coverage-guided, libFuzzer).

    .venv/bin/python fuzz/run.py TARGET [TARGET ...] [--runs N | --seconds S] [--parallel K]
    .venv/bin/python fuzz/run.py all --seconds 600          # every target, 600 s each
    .venv/bin/python fuzz/run.py sasl --runs 200000 -- -max_len=8192   # extra libFuzzer flags
    .venv/bin/python fuzz/run.py --reproduce sasl fuzz/crashes/sasl-crash-...   # no atheris needed
    .venv/bin/python fuzz/run.py --minimize sasl fuzz/crashes/sasl-crash-...

Each target runs in its own process (libFuzzer exits when it is done) on the
seed corpus ``fuzz/corpus/<target>/`` (read only) and its own working corpus
``fuzz/work/<target>/`` (new interesting inputs go there; not committed), with
the dictionary ``fuzz/dict/<target>.dict`` when there is one.  A crash or a
broken invariant is written to ``fuzz/crashes/<target>-crash-<sha1>``; the
summary at the end gives each target's executed inputs, time and crashes.
Only ``popservice`` is instrumented for coverage (not the harness, not Twisted).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")
_PROGRESS = re.compile(rb"^#(\d+)\s")
_ARTIFACT = re.compile(rb"Test unit written to (\S+)")


def _import_path() -> None:
    """Import C{fuzz.*} and C{popservice} from the checkout, not this directory's modules as top level."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


_import_path()

from fuzz import TARGETS  # noqa: E402  (needs the path set above)


@dataclass
class Result:
    target: str
    runs: int = 0
    seconds: float = 0.0
    returncode: int = 0
    crashes: list[str] = field(default_factory=list)


def worker(target: str, flags: list[str]) -> None:
    """In the child process: instrument popservice, import the target, hand over to libFuzzer."""
    import importlib

    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from twisted.logger import globalLogBeginner

    # Logged warnings (passwd-file lines, SASL refusals) would only pile up in memory.
    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    # Not "RegEx": atheris 3.0's hook fails on some bytes patterns (cryptography's, popservice.body's).
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports(include=["popservice"]):
        module = importlib.import_module("fuzz." + target)
    # libFuzzer re-runs argv[0] through the shell for -minimize_crash: make it this worker's command line.
    command = shlex.join([sys.executable, os.path.abspath(__file__), "--worker", target, "--"])
    atheris.Setup([command, *flags], module.TestOneInput)
    atheris.Fuzz()


def libfuzzer_flags(target: str, runs: int | None, seconds: int | None, extra: list[str],
                    work_root: str, crashes: str) -> list[str]:
    work = os.path.join(work_root, target)
    seeds = os.path.join(HERE, "corpus", target)
    os.makedirs(work, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    flags = ["-artifact_prefix=" + os.path.join(crashes, target + "-"), "-timeout=20", "-rss_limit_mb=2048",
             "-print_final_stats=1"]
    dictionary = os.path.join(HERE, "dict", target + ".dict")
    if os.path.exists(dictionary):
        flags.append("-dict=" + dictionary)
    if runs is not None:
        flags.append("-runs=%d" % (runs,))
    if seconds is not None:
        flags.append("-max_total_time=%d" % (seconds,))
    return [*flags, *extra, work, seeds]


def run_target(target: str, runs: int | None, seconds: int | None, extra: list[str], quiet: bool,
               work_root: str, crashes: str) -> Result:
    result = Result(target)
    argv = [sys.executable, os.path.abspath(__file__), "--worker", target, "--",
            *libfuzzer_flags(target, runs, seconds, extra, work_root, crashes)]
    start = time.monotonic()
    log_path = os.path.join(work_root, target + ".log")
    with open(log_path, "wb") as log:
        # atheris prints a failing input's Python traceback on stdout, libFuzzer its report on stderr
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = _PROGRESS.match(line) or _DONE.search(line)
            if m:
                result.runs = max(result.runs, int(m.group(1)))
            m = _ARTIFACT.search(line)
            if m:
                result.crashes.append(m.group(1).decode())
            if not quiet:
                sys.stderr.buffer.write(b"[" + target.encode() + b"] " + line)
                sys.stderr.flush()
        result.returncode = proc.wait()
    result.seconds = time.monotonic() - start
    return result


def reproduce(target: str, path: str) -> int:
    """Run one input through the target without atheris; 0 when it passes."""
    import importlib
    import traceback

    module = importlib.import_module("fuzz." + target)
    with open(path, "rb") as f:
        data = f.read()
    try:
        module.TestOneInput(data)
    except BaseException:
        traceback.print_exc()
        print("%s: %r fails" % (target, data[:200]))
        return 1
    print("%s: passes" % (target,))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        worker(argv[1], rest)
        return 0
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="targets (%s) or 'all'" % (", ".join(TARGETS),))
    parser.add_argument("--runs", type=int, help="inputs to execute per target")
    parser.add_argument("--seconds", type=int, help="seconds per target")
    parser.add_argument("--parallel", type=int, default=1, help="targets run at once")
    parser.add_argument("--quiet", action="store_true", help="only the summary (logs in the work directory)")
    parser.add_argument("--work", default=os.path.join(HERE, "work"),
                        help="working corpora and logs (default fuzz/work)")
    parser.add_argument("--crashes", default=os.path.join(HERE, "crashes"),
                        help="where failing inputs are written (default fuzz/crashes)")
    parser.add_argument("--reproduce", nargs=2, metavar=("TARGET", "FILE"), help="run one input, no atheris")
    parser.add_argument("--minimize", nargs=2, metavar=("TARGET", "FILE"), help="minimise a crashing input")
    args = parser.parse_args(argv)
    if args.reproduce:
        return reproduce(*args.reproduce)
    if args.minimize:
        target, path = args.minimize
        out = path + ".min"
        flags = ["-minimize_crash=1", "-runs=%d" % (args.runs or 20000), "-exact_artifact_path=" + out,
                 *extra, path]
        code = subprocess.call([sys.executable, os.path.abspath(__file__), "--worker", target, "--", *flags],
                               cwd=ROOT)
        print("minimised input: %s" % (out,))
        return code
    targets = list(TARGETS) if args.targets in (["all"], []) else args.targets
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error("unknown target(s) %s; known: %s" % (", ".join(unknown), ", ".join(TARGETS)))
    if args.runs is None and args.seconds is None:
        args.seconds = 60
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        results = list(pool.map(lambda t: run_target(t, args.runs, args.seconds, extra, args.quiet,
                                                     args.work, args.crashes), targets))
    print("\n%-16s %12s %10s %8s  %s" % ("target", "inputs", "seconds", "exit", "crashes"))
    for r in results:
        print("%-16s %12d %10.1f %8d  %s" % (r.target, r.runs, r.seconds, r.returncode,
                                             " ".join(r.crashes) or "-"))
    print("%-16s %12d %10.1f" % ("total", sum(r.runs for r in results), sum(r.seconds for r in results)))
    return 0 if all(r.returncode == 0 and not r.crashes for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
