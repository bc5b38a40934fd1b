"""
C{popservice db} and C{popservice migrate-store}: the PostgreSQL store's
schema, and moving Maildirs into it.

    popservice db upgrade postgresql://user@host/db
        Apply the schema migrations this popservice needs (each once, in
        order, each in its own transaction); safe to run again.
    popservice db status postgresql://user@host/db
        Print the database's schema version and the one this popservice needs.
    popservice migrate-store maildir:/srv/mail/%u postgresql://... [USER ...] [--passwd FILE]
        Copy each user's Maildir into the database, keeping every UIDL, and
        check every message byte for byte (CRLF-normalised) after the copy.
        The Maildir is locked (as a POP3 session locks it) while it is copied,
        and left in place.  Resumable: a message whose UIDL is already in the
        database is not copied again, only checked, so an interrupted run is
        simply run again.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_TEMPFAIL = 75


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser("db", help="manage the PostgreSQL store's schema")
    db_sub = p.add_subparsers(dest="db_command", required=True)
    for name, text in (("upgrade", "apply the schema migrations this popservice needs"),
                       ("status", "print the schema version")):
        q = db_sub.add_parser(name, help=text)
        q.add_argument("url", help="postgresql://user@host:port/dbname (a libpq URL)")
        q.set_defaults(func=run_db)
    m = sub.add_parser("migrate-store", help="copy Maildirs into the PostgreSQL store, keeping UIDLs")
    m.add_argument("source", help="maildir:TEMPLATE, as given to twistd pop3 --mail")
    m.add_argument("target", help="postgresql://... URL of the target store")
    m.add_argument("users", nargs="*", help="users to move (default: every user of --passwd)")
    m.add_argument("--passwd", help="passwd-file: its users (when none are named) and homes for ~")
    m.set_defaults(func=run_migrate)


def run_db(args: argparse.Namespace) -> int:
    import psycopg

    from popservice.database import schema

    try:
        with psycopg.connect(args.url) as conn:
            if args.db_command == "upgrade":
                applied = schema.upgrade(conn)
                print("schema at version %d%s" % (schema.SCHEMA_VERSION, " (applied %s)"
                                                  % ", ".join(map(str, applied)) if applied else ""))
            else:
                with conn.cursor() as cursor:
                    version = schema.current_version(cursor)
                print("schema at version %d; this popservice needs %d" % (version, schema.SCHEMA_VERSION))
                return EX_OK if version == schema.SCHEMA_VERSION else EX_TEMPFAIL
    except psycopg.Error as e:
        print("popservice db: %s" % (str(e).strip(),), file=sys.stderr)
        return EX_TEMPFAIL
    except schema.SchemaMismatch as e:
        print("popservice db: %s" % (e,), file=sys.stderr)
        return EX_SOFTWARE
    return EX_OK


def run_migrate(args: argparse.Namespace) -> None:
    from twisted.internet import defer, task

    def main(reactor: Any) -> "defer.Deferred[None]":
        def done(status: int) -> None:
            if status:
                raise SystemExit(status)

        return defer.Deferred.fromCoroutine(migrate(args)).addCallback(done)

    # react exits the process: 0, or the status of the SystemExit.
    task.react(main)


async def migrate(args: argparse.Namespace) -> int:
    from twisted.internet import defer

    from popservice.auth.passwdfile import parse_passwd_file
    from popservice.body import LineEndNormaliser
    from popservice.interfaces import MailboxInUse, MailboxUnavailable
    from popservice.stores.maildir import MaildirStore
    from popservice.stores.postgres import PostgresStore
    from popservice.stores.postgres.mailbox import ChunkStream
    from popservice.stores.postgres.store import _mailbox_id

    homes: dict[str, str | None] = {}
    if args.passwd:
        with open(args.passwd, "rb") as f:
            for record in parse_passwd_file(f.read(), args.passwd).values():
                homes[record.user] = record.home or None
    users = list(args.users) or sorted(homes)
    if not users:
        print("popservice migrate-store: name the users, or give --passwd", file=sys.stderr)
        return EX_DATAERR
    source = MaildirStore.from_description(args.source)
    target = PostgresStore.from_description(args.target, lock_policy="none")
    status = EX_OK
    try:
        await target.check_schema()
        for user in users:
            try:
                mailbox = await source.open_mailbox(user, homes.get(user))
            except MailboxInUse:
                print("%s: in use by a POP3 session, skipped (run again later)" % (user,), file=sys.stderr)
                status = EX_TEMPFAIL
                continue
            except MailboxUnavailable as e:
                print("%s: %s, skipped" % (user, e), file=sys.stderr)
                status = EX_NOUSER
                continue
            copied = checked = 0
            try:
                listing = await mailbox.listing()
                mailbox_id = await target.db.run(_mailbox_id, user)
                for index, info in enumerate(listing):
                    stream = await mailbox.open(index)
                    parts = []
                    while True:
                        chunk = await defer.maybeDeferred(stream.read)
                        if not chunk:
                            break
                        parts.append(chunk)
                    stream.close()
                    original = b"".join(parts)
                    if await target.deliver(user, None, original, None, uidl=info.uid):
                        copied += 1
                    norm = LineEndNormaliser()
                    expected = norm.feed(original) + norm.finish()
                    message_id = await target.db.run(_message_by_uidl, mailbox_id, info.uid)
                    reader = ChunkStream(target.db, message_id)
                    stored = []
                    while True:
                        chunk = await reader.read()
                        if not chunk:
                            break
                        stored.append(chunk)
                    if b"".join(stored) != expected:
                        print("%s: message %s differs in the database: NOT migrated correctly"
                              % (user, info.uid), file=sys.stderr)
                        status = EX_SOFTWARE
                    else:
                        checked += 1
            finally:
                await mailbox.close()
            print("%s: %d messages, %d copied now, %d checked byte for byte" % (user, len(listing), copied,
                                                                               checked))
    finally:
        target.db.close()
    return status


def _message_by_uidl(cursor: Any, mailbox_id: int, uidl: str) -> int:
    cursor.execute("SELECT id FROM messages WHERE mailbox_id = %s AND uidl = %s", (mailbox_id, uidl))
    return int(cursor.fetchone()[0])
