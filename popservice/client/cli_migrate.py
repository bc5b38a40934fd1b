"""
C{popservice migrate}: copy every message of a POP3 mailbox into a Maildir
served by popservice, adding the old server's UIDLs to the Maildir's
C{popservice-uidlist} so that clients do not download everything again.
Runs on Twisted, imported when it runs.
"""

from __future__ import annotations

import os
import sys
import time

from popservice.client.cli_common import EX_OK, connection_kwargs, run_reactor
from popservice.client.cli_credentials import resolve_credentials
from popservice.client.url import parse_url

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    import argparse
    from typing import Any

__all__ = ["run_migrate"]


def _write_popservice_index(path: str, entries: list[tuple[str, int, str]]) -> None:
    """
    Add C{(uidl, size, base name)} entries to the Maildir's C{popservice-uidlist}
    (the format of popservice.stores.maildir), atomically, holding the store's
    C{popservice-uidlist.lock} (a blocking flock, held only for the rewrite) so
    a popservice server scanning the same Maildir never loses either update.
    """
    from popservice.stores import maildir as store

    with store._index_lock(path):
        text = store._read_text(os.path.join(path, store.INDEX_FILE_NAME))
        index = store.parse_index(text) if text is not None else None
        if index is None:
            index = store._Index(store._fresh_uidvalidity(), 1)
        for uidl, size, base in entries:
            index.entries[base] = (uidl, size)
        store._write_index(path, index)


def run_migrate(args: argparse.Namespace) -> int:
    from twisted.internet import defer

    from popservice.client.connect import connect

    url = parse_url(args.url)
    creds = resolve_credentials(args, parse_url(args.url))
    kind, _, path = args.to.partition(":")
    if kind != "maildir" or not path:
        raise SystemExit("popservice: migrate needs --to maildir:PATH")
    path = os.path.abspath(os.path.expanduser(path))
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        from popservice.client.delivery import fsync_dir

        client = yield connect(reactor, url, creds, **connection_kwargs(args))
        uidls = yield client.uidl()
        sizes = {e.number: e.size for e in (yield client.list())}
        # keep UIDLs the target already knows (a rerun after a crash copies nothing twice)
        known: set[str] = set()
        try:
            with open(os.path.join(path, "popservice-uidlist"), encoding="utf-8") as f:
                known = {line.split(" ", 1)[0] for line in f.read().split("\n")[1:] if line}
        except FileNotFoundError:
            pass
        entries: list[tuple[str, int, str]] = []
        base_ts = int(time.time())
        total = 0
        for i, e in enumerate(uidls):
            if e.uid in known:
                continue
            # POP3 order = delivery order: keep it with increasing time stamps
            base = f"{base_ts}.M{i:06d}P{os.getpid()}.migrated,W={sizes.get(e.number, 0)}"
            tmp = os.path.join(path, "tmp", base)
            with open(tmp, "wb") as f:
                yield client.retrieve(e.number, f.write, crlf=False)
                f.flush()
                os.fsync(f.fileno())
                total += f.tell()
            os.rename(tmp, os.path.join(path, "cur", base + ":2,"))
            entries.append((e.uid, sizes.get(e.number, 0), base))
        fsync_dir(os.path.join(path, "cur"))
        if entries:
            _write_popservice_index(path, entries)
        if args.delete:
            for e in uidls:
                yield client.delete(e.number)
        yield client.quit()
        if not args.quiet:
            sys.stderr.write(f"migrated {len(entries)} messages ({total} bytes) into {path}, "
                             f"{len(uidls) - len(entries)} already there; UIDLs kept\n")
        return EX_OK

    return run_reactor(main)
