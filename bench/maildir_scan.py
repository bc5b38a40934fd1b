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
import functools
import gc
import itertools
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


_delivered = itertools.count()


def deliver_one(box: str) -> None:
    """A new message in new/, as a delivery agent leaves it (renamed from tmp/)."""
    n = next(_delivered)
    name = "%d.M%dP2.host" % (1800000000 + n, n)
    with open(os.path.join(box, "tmp", name), "wb") as f:
        f.write(b"Subject: new %d\n\n" % n + BODY)
    os.rename(os.path.join(box, "tmp", name), os.path.join(box, "new", name))


def timings_ms(
    fn: Callable[[], object], runs: int, before: Callable[[], object] | None = None
) -> list[float]:
    times = []
    for _ in range(runs):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def clear_cache() -> None:
    clear = getattr(maildir, "_clear_index_cache", None)  # absent before the cache existed
    if clear is not None:
        clear()


def forget_index(box: str) -> None:
    index = os.path.join(box, INDEX_FILE_NAME)
    if os.path.exists(index):
        os.unlink(index)
    clear_cache()


def twisted_open(box: str) -> None:
    mbox = TwistedMaildirMailbox(box.encode())
    sizes = mbox.listMessages()
    assert isinstance(sizes, list)


def traced(fn: Callable[[], object]) -> tuple[int, int]:
    """Bytes allocated by C{fn} and still held: (with its result alive, after dropping it)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
        del result
        gc.collect()
        return held, tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def memory_per_message(box: str, count: int) -> tuple[float, float, float]:
    """
    Bytes per message: held by an open mailbox without the listing cache;
    held by an open mailbox made from the cache (a warm login); kept by the
    cache once the session is gone.
    """
    scan_maildir(box, FORMAT)  # the index is up to date
    open_mailbox = functools.partial(lambda: MaildirMailbox(box, scan_maildir(box, FORMAT), None))
    cache = getattr(maildir, "_listing_cache", None)  # absent before the cache existed
    clear_cache()
    if cache is None:
        session, _ = traced(open_mailbox)
        return session / count, session / count, 0.0
    minimum, cache.minimum = cache.minimum, sys.maxsize  # nothing is cached
    try:
        session, _ = traced(open_mailbox)
    finally:
        cache.minimum = minimum
    clear_cache()
    _, kept = traced(open_mailbox)  # the session is dropped at once: what stays is the cache's
    warm_session, _ = traced(open_mailbox)
    clear_cache()
    return session / count, warm_session / count, kept / count


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
    parser.add_argument("--cold-runs", type=int, default=3, help="runs of the cold scan")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    tmp = tempfile.mkdtemp(prefix="maildir-bench-")
    try:
        rows: list[dict[str, Any]] = []
        for count in counts:
            user = f"u{count}"
            box = os.path.join(tmp, user)
            build(box, count)
            row: dict[str, Any] = {"count": count, "user": user}
            scan = functools.partial(scan_maildir, box, FORMAT)
            row["cold"] = timings_ms(scan, args.cold_runs, before=functools.partial(forget_index, box))
            scan()
            row["uncached"] = timings_ms(scan, args.runs, before=clear_cache)
            scan()
            row["warm"] = timings_ms(scan, args.runs)
            row["new"] = timings_ms(scan, args.runs, before=functools.partial(deliver_one, box))
            scan()
            row["twisted"] = timings_ms(functools.partial(twisted_open, box), args.runs)
            row["session"], row["warm session"], row["cache"] = memory_per_message(box, count)
            rows.append(row)

        async def opens(reactor: object) -> None:
            store = MaildirStore(os.path.join(tmp, "%u"))
            for row in rows:
                await store_open_ms(store, row["user"], 2)  # warm the thread pool and the cache
                row["open"] = [t * 1000 for t in await store_open_ms(store, row["user"], args.runs)]
            report(rows, args.runs)

        try:
            task.react(lambda reactor: defer.ensureDeferred(opens(reactor)))
        except SystemExit as e:
            if e.code:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(rows: list[dict[str, Any]], runs: int) -> None:
    def ms(times: list[float]) -> str:
        return f"{statistics.median(times):7.2f} ({min(times):6.2f})"

    print(f"median (min) of {runs} runs, cold scans of fewer; ms")
    print("  cold scan: no index, every file read; uncached: index parsed (listing cache emptied);")
    print("  warm scan/open: as a repeated login sees it; open: MaildirStore.open_mailbox + listing;")
    print("  1 new msg: a scan after one delivery to new/ (moved to cur/, index rewritten and fsynced);")
    print("  twisted: twisted.mail.maildir.MaildirMailbox(path) + listMessages()")
    print(f"{'messages':>8} {'cold scan':>16} {'uncached scan':>16} {'warm scan':>16} {'1 new msg':>16} "
          f"{'warm open':>16} {'twisted':>16} {'open/twisted':>12}")
    for row in rows:
        ratio = statistics.median(row["open"]) / statistics.median(row["twisted"])
        print(f"{row['count']:>8} {ms(row['cold']):>16} {ms(row['uncached']):>16} {ms(row['warm']):>16} "
              f"{ms(row['new']):>16} {ms(row['open']):>16} {ms(row['twisted']):>16} {ratio:>12.2f}")
    print("memory, bytes per message: held by an open mailbox without the cache / on a warm login"
          " (infos shared with the cache) / kept by the cache after the session")
    for row in rows:
        print(f"{row['count']:>8} {row['session']:>10.0f} / {row['warm session']:.0f} / {row['cache']:.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
