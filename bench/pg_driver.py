"""
Which PostgreSQL driver for the store: twisted.enterprise.adbapi over sync
psycopg 3 in a thread pool (default reactor), or psycopg 3's async API with
psycopg-pool under Twisted's asyncio reactor.  Both run the store's login
transaction (mailbox row, lease, listing of a 20-message mailbox) and a
lease release, N times at concurrency C, against a private PostgreSQL
(tests/pg.py); the figure is transactions per second and the process's CPU
per transaction.  Each driver runs in its own process (the reactor differs).

    .venv/bin/python bench/pg_driver.py [--n 3000] [--concurrency 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

USERS = 50


def prepare(url: str) -> None:
    import psycopg

    from popservice.stores.postgres.store import _deliver, normalise

    with psycopg.connect(url) as conn, conn.cursor() as cur:
        chunks, size = normalise(b"Subject: x\n\n" + b"y" * 4000 + b"\n")
        for u in range(USERS):
            for _ in range(20):
                _deliver(cur, "u%d" % u, chunks, size, None, None)
        conn.commit()


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_adbapi(url: str, n: int, concurrency: int) -> dict[str, float]:
    from twisted.internet import defer, reactor, task

    from popservice.database.pool import Database
    from popservice.stores.postgres.lease import _release
    from popservice.stores.postgres.store import _open

    db = Database(url, max_connections=8)
    out: dict[str, float] = {}

    async def one(i: int) -> None:
        user = "u%d" % (i % USERS)
        holder = "bench:%d" % i
        mailbox_id, generation, _ = await db.run(_open, user, holder, 60.0, 60.0)
        await db.run(_release, mailbox_id, holder, generation)

    async def main() -> None:
        await one(0)  # warm the pool
        start, c0 = time.perf_counter(), cpu()
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                await one(i)

        await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
        out["seconds"] = time.perf_counter() - start
        out["cpu"] = cpu() - c0

    d = defer.Deferred.fromCoroutine(main())
    d.addBoth(lambda r: (db.close(), reactor.stop(), r)[-1])  # type: ignore[attr-defined]
    task.deferLater(reactor, 0, lambda: None)
    reactor.run()  # type: ignore[attr-defined]
    return out


def run_async(url: str, n: int, concurrency: int) -> dict[str, float]:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    import asyncio

    from psycopg_pool import AsyncConnectionPool
    from twisted.internet import defer, reactor

    out: dict[str, float] = {}

    async def open_and_release(pool: AsyncConnectionPool, i: int) -> None:
        user = "u%d" % (i % USERS)
        holder = "bench:%d" % i
        async with pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    "INSERT INTO mailboxes (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = "
                    "EXCLUDED.name RETURNING id", (user,))
                mailbox_id = (await cur.fetchone())[0]  # type: ignore[index]
                cur = await conn.execute(
                    "INSERT INTO leases (mailbox_id, holder, generation, expires, last_activity) "
                    "VALUES (%s, %s, 1, now() + 60 * interval '1 second', now()) "
                    "ON CONFLICT (mailbox_id) DO UPDATE SET holder = EXCLUDED.holder, "
                    "generation = leases.generation + 1, expires = EXCLUDED.expires, last_activity = now() "
                    "WHERE leases.expires < now() OR leases.last_activity < now() - 60 * interval '1 second' "
                    "RETURNING generation", (mailbox_id, holder))
                generation = (await cur.fetchone())[0]  # type: ignore[index]
                cur = await conn.execute("SELECT id, size, uidl FROM messages WHERE mailbox_id = %s "
                                         "ORDER BY id", (mailbox_id,))
                await cur.fetchall()
            async with conn.transaction():
                await conn.execute("UPDATE leases SET expires = now() - interval '1 second' WHERE "
                                   "mailbox_id = %s AND holder = %s AND generation = %s",
                                   (mailbox_id, holder, generation))

    async def main() -> None:
        pool = AsyncConnectionPool(url, min_size=8, max_size=8, open=False)
        await pool.open()
        await open_and_release(pool, 0)
        start, c0 = time.perf_counter(), cpu()
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                await open_and_release(pool, i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out["seconds"] = time.perf_counter() - start
        out["cpu"] = cpu() - c0
        await pool.close()

    d = defer.Deferred.fromFuture(asyncio.ensure_future(main()))
    d.addBoth(lambda r: (reactor.stop(), r)[-1])  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return out


def child(driver: str, url: str, n: int, concurrency: int) -> None:
    result = (run_adbapi if driver == "adbapi" else run_async)(url, n, concurrency)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("DRIVER", "URL"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.n, args.concurrency)
        return
    from tests import pg

    url = pg.fresh_database()
    prepare(url)
    results: dict[str, list[dict[str, float]]] = {"adbapi": [], "psycopg-async": []}
    for _ in range(args.repeats):
        for driver in results:  # interleaved
            p = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--concurrency",
                                str(args.concurrency), "--child", driver.split("-")[0], url],
                               capture_output=True, text=True, check=True)
            results[driver].append(json.loads(p.stdout.strip().splitlines()[-1]))
    print("%d login+release transactions, concurrency %d, %d repeats (medians)"
          % (args.n, args.concurrency, args.repeats))
    for driver, runs in results.items():
        rates = sorted(args.n / r["seconds"] for r in runs)
        cpus = sorted(1000 * r["cpu"] / args.n for r in runs)
        print("%-14s %8.0f tx/s   %.3f CPU-ms/tx (client process)" % (driver, rates[len(rates) // 2],
                                                                        cpus[len(cpus) // 2]))


if __name__ == "__main__":
    main()
