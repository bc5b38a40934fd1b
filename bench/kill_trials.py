#!/usr/bin/env python3
"""
SIGKILL trials against a real C{twistd pop3} over a Maildir (issue
"Reliability", item 8): the server is killed with SIGKILL during UPDATE (a
random moment after QUIT, stratified over the measured length of UPDATE),
during RETR of a large message, and during a login that moves new mail to
C{cur/}; after each kill it is restarted and the Maildir checked: nothing
lost that was not DELE'd, nothing resurrected, the UIDL index valid (parsed
with the store's own parser), every UIDL ever shown unchanged, and the next
login not blocked by C{[IN-USE]}.  The machinery is
L{tests.interop.test_faults.KillTrials}; C{trial tests.interop.test_faults}
runs a 10-trial slice of it.

    .venv/bin/python bench/kill_trials.py [--trials 100] [--seed 1] [--messages 300] [--max-dele 150]

Prints the counts (trials, messages lost, resurrected, UIDL changes, blocked
logins, and where the kills landed); exits 1 when any failure count is not 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.interop.test_faults import MIB, KillTrials  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--messages", type=int, default=300, help="small messages kept in the mailbox")
    parser.add_argument("--large", type=int, default=3, help="large messages kept in the mailbox")
    parser.add_argument("--large-mib", type=int, default=6, help="size of a large message")
    parser.add_argument("--max-dele", type=int, default=150, help="DELEs per UPDATE trial (at least half)")
    parser.add_argument("--fresh", type=int, default=150, help="new messages per login trial")
    parser.add_argument("--keep", action="store_true", help="keep the temporary world (its path is printed)")
    args = parser.parse_args(argv)
    if args.keep:
        os.environ["POPSERVICE_INTEROP_KEEP"] = "1"
    started = time.monotonic()
    trials = KillTrials(seed=args.seed, small=args.messages, large=args.large,
                        large_size=args.large_mib * MIB, max_dele=args.max_dele, fresh=args.fresh)
    print("seed %d, world %s" % (args.seed, trials.world.root))
    try:
        counts = trials.run(args.trials)
        tracebacks = trials.server_tracebacks()
    finally:
        trials.close()
    print()
    print(counts.summary())
    print("server tracebacks in the log: %d" % tracebacks)
    print("%.0f s in all" % (time.monotonic() - started))
    for problem in counts.problems:
        print("  " + problem)
    return 1 if counts.failures() or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
