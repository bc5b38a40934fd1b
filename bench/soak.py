#!/usr/bin/env python3
"""
Soak a real C{twistd pop3} (issue "Reliability", item 8): POP3 sessions
(logins, UIDL, TOP, RETR checked against a digest, DELE+QUIT, random
disconnects) for several users at once, while messages are delivered over
LMTP and through C{popservice deliver}; a ledger of every message delivered
and removed is compared with the Maildirs at the end (delivered - removed ==
present, by Message-ID), and the server's VmRSS is sampled every second.
The machinery is L{tests.interop.test_soak.Soak}; C{trial
tests.interop.test_soak} runs it for 60 seconds.

    .venv/bin/python bench/soak.py --minutes 30 [--clients 6] [--users 8] [--seed N]

Exits 1 when ledger and disk disagree, an error happened, or the RSS grew
more than --flat-mib between the end of the warm-up and the end of the load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.interop.test_soak import Soak  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=6, help="POP3 client threads")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--lmtp-threads", type=int, default=2)
    parser.add_argument("--deliver-threads", type=int, default=1, help="threads running popservice deliver")
    parser.add_argument("--target", type=int, default=60, help="messages a mailbox is kept near")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default: a third, 15-600)")
    parser.add_argument("--flat-mib", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--fixed-mmap-threshold", action="store_true",
                        help="run the server with MALLOC_MMAP_THRESHOLD_=131072 (glibc's dynamic threshold "
                        "otherwise keeps freed multi-MiB blocks: the RSS climbs to a plateau over minutes)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary world")
    args = parser.parse_args(argv)
    if args.keep:
        os.environ["POPSERVICE_INTEROP_KEEP"] = "1"
    soak = Soak(seconds=args.minutes * 60, users=args.users, clients=args.clients,
                lmtp_threads=args.lmtp_threads, cli_threads=args.deliver_threads, target=args.target,
                seed=args.seed, warmup=args.warmup, flat_kib=int(args.flat_mib * 1024),
                fixed_mmap_threshold=args.fixed_mmap_threshold)
    print("seed %d, world %s, %.1f minutes" % (args.seed, soak.world.root, args.minutes))
    try:
        stats = soak.run()
        problems = soak.verify()
        tracebacks = soak.world.log_text().count("Traceback")
    finally:
        soak.close()
    print()
    print(soak.report(problems))
    print("server tracebacks in the log: %d" % tracebacks)
    for line in problems + stats.errors[:20]:
        print("  " + line)
    return 1 if problems or stats.errors or tracebacks or not soak.rss_flat() else 0


if __name__ == "__main__":
    sys.exit(main())
