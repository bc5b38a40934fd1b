#!/usr/bin/env python3
"""
How long opening a big Maildir takes: popservice's L{scan_maildir} (cold:
no index, every message file read for its size; warm: the index is up to
date), the whole L{MaildirStore.open_mailbox} (lock, thread hops, scan,
mailbox construction) as a login does it, and Twisted's stock
C{twisted.mail.maildir.MaildirMailbox} construction plus C{listMessages()}
(one C{stat} per file, no UIDLs) on the same directory for comparison.
Also the memory an opened mailbox keeps per message (tracemalloc).

    .venv/bin/python bench/maildir_scan.py [--counts 1000,10000] [--runs 10]

The fixture is built in a temporary directory: C{cur/} holds N files named
C{<1700000000+i>.M<i>P1.host:2,} of about 1 KiB each.  Times are medians.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer, task  # noqa: E402
from twisted.mail.maildir import MaildirMailbox as TwistedMaildirMailbox  # noqa: E402

from popservice.stores import maildir  # noqa: E402
from popservice.stores.maildir import (  # noqa: E402
    INDEX_FILE_NAME,
    DovecotUIDLFormat,
    MaildirMailbox,
    MaildirStore,
    scan_maildir,
)

FORMAT = DovecotUIDLFormat("%08Xu%08Xv")
BODY = b"".join(b"Line %04d of a message body, padded to some length....\n" % i for i in range(18))


def build(box: str, count: int) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(box, sub), exist_ok=True)
    cur = os.path.join(box, "cur")
    for i in range(count):
        with open(os.path.join(cur, "%d.M%dP1.host:2," % (1700000000 + i, i)), "wb") as f:
            f.write(b"Subject: message %d\n\n" % i + BODY)


def median_ms(fn: Callable[[], object], runs: int, before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(runs):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def forget_index(box: str) -> None:
    with_path = os.path.join(box, INDEX_FILE_NAME)
    if os.path.exists(with_path):
        os.unlink(with_path)
    clear = getattr(maildir, "_clear_index_cache", None)
    if clear is not None:
        clear()


def twisted_open(box: str) -> None:
    mbox = TwistedMaildirMailbox(box.encode())
    sizes = mbox.listMessages()
    assert isinstance(sizes, list)


def memory_per_message(box: str, count: int) -> tuple[float, float]:
    """(bytes kept per message by an opened mailbox, bytes per message of any process-wide cache)."""
    scan_maildir(box, FORMAT)  # warm
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    clear = getattr(maildir, "_clear_index_cache", None)
    mbox = MaildirMailbox(box, scan_maildir(box, FORMAT), None)
    gc.collect()
    with_mbox = tracemalloc.get_traced_memory()[0]
    del mbox
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    if clear is not None:
        clear()
    return (with_mbox - after) / count, (after - base) / count


async def store_open_ms(store: MaildirStore, user: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mbox = await store.open_mailbox(user, None)
        listing = await mbox.listing()
        times.append(time.perf_counter() - t0)
        await mbox.close()
        assert listing
    return times


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,10000", help="comma-separated message counts")
    parser.add_argument("--runs", type=int, default=10, help="runs per measurement (median)")
    parser.add_argument("--cold-runs", type=int, default=3, help="runs of the cold scan (median)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    tmp = tempfile.mkdtemp(prefix="maildir-bench-")
    try:
        rows = []
        for count in counts:
            user = f"u{count}"
            box = os.path.join(tmp, user)
            build(box, count)
            cold = median_ms(lambda b=box: scan_maildir(b, FORMAT), args.cold_runs,
                             before=lambda b=box: forget_index(b))
            scan_maildir(box, FORMAT)
            warm = median_ms(lambda b=box: scan_maildir(b, FORMAT), args.runs)
            twisted = median_ms(lambda b=box: twisted_open(b), args.runs)
            per_session, per_process = memory_per_message(box, count)
            rows.append([count, cold, warm, twisted, per_session, per_process, box, user])

        async def opens(reactor: object) -> None:
            store = MaildirStore(os.path.join(tmp, "%u"))
            for row in rows:
                await store_open_ms(store, str(row[7]), 2)  # warm the thread pool and caches
                row.append(statistics.median(await store_open_ms(store, str(row[7]), args.runs)) * 1000)
            report(rows, args.runs)

        try:
            task.react(lambda reactor: defer.ensureDeferred(opens(reactor)))
        except SystemExit as e:
            if e.code:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(rows: list[list[Any]], runs: int) -> None:
    print(f"median of {runs} runs (cold: of a few); times in ms; memory in bytes per message")
    print(f"{'messages':>8} {'cold scan':>10} {'warm scan':>10} {'warm open':>10} "
          f"{'twisted':>10} {'open/twisted':>12} {'mem/session':>12} {'mem/process':>12}")
    for count, cold, warm, twisted, per_session, per_process, _box, _user, open_ms in rows:
        print(f"{count:>8} {cold:>10.1f} {warm:>10.2f} {open_ms:>10.2f} {twisted:>10.2f} "
              f"{open_ms / twisted:>12.2f} {per_session:>12.0f} {per_process:>12.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
