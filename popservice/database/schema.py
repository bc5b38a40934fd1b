"""
The PostgreSQL schema of the mail store, versioned: L{MIGRATIONS} is the
list of steps, each run once, in order, in its own transaction, by
C{popservice db upgrade}; the table C{popservice_schema} records how far a
database has come.  The store refuses to serve a database whose schema is
older or newer than L{SCHEMA_VERSION}.

Written for PostgreSQL and the engines that speak its SQL (CockroachDB,
YugabyteDB, Citus): no advisory locks, no large objects, no LISTEN/NOTIFY, no
triggers; every table has a primary key.  What would need care elsewhere is
said where it is used (L{popservice.stores.postgres.store}).

Per message: its mailbox, its delivery order (C{id}, from a sequence), the
UIDL fixed at delivery (RFC 1939 section 7: never reused; imported UIDLs
kept), the exact size as transmitted (CRLF line ends, before byte-stuffing),
the received time, an idempotency key for deliveries, and the body in
C{message_chunks} (CRLF-normalised bytea chunks, streamed out one at a time).
STAT, LIST and UIDL read one covering index, C{messages_listing}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: (version, statements): run in order; never edit a released step, add one.
MIGRATIONS: Sequence[tuple[int, Sequence[str]]] = (
    (1, (
        """CREATE TABLE mailboxes (
            id bigserial PRIMARY KEY,
            name text NOT NULL UNIQUE,
            created timestamptz NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE messages (
            id bigint PRIMARY KEY,
            mailbox_id bigint NOT NULL REFERENCES mailboxes (id),
            uidl text NOT NULL,
            size bigint NOT NULL,
            received timestamptz NOT NULL DEFAULT now(),
            idempotency_key text,
            UNIQUE (mailbox_id, uidl),
            UNIQUE (mailbox_id, idempotency_key)
        )""",
        "CREATE SEQUENCE messages_id_seq OWNED BY messages.id",
        # Login: one index-only scan gives STAT, LIST and UIDL in delivery order.
        "CREATE INDEX messages_listing ON messages (mailbox_id, id) INCLUDE (size, uidl)",
        """CREATE TABLE message_chunks (
            message_id bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (message_id, seq)
        )""",
        # The cluster-wide session lock: one row per mailbox, never deleted, so
        # the generation only grows.
        """CREATE TABLE leases (
            mailbox_id bigint PRIMARY KEY REFERENCES mailboxes (id),
            holder text NOT NULL,
            generation bigint NOT NULL,
            expires timestamptz NOT NULL,
            last_activity timestamptz NOT NULL
        )""",
        """CREATE TABLE users (
            name text PRIMARY KEY,
            password text NOT NULL,
            home text,
            extra jsonb NOT NULL DEFAULT '{}'::jsonb
        )""",
    )),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaMismatch(Exception):
    """The database's schema is not the one this popservice speaks."""


def current_version(cursor: Any) -> int:
    """The schema version of the database C{cursor} talks to (0: none yet)."""
    cursor.execute("SELECT to_regclass('popservice_schema') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return 0
    cursor.execute("SELECT max(version) FROM popservice_schema")
    row = cursor.fetchone()
    return int(row[0] or 0)


def upgrade(connection: Any) -> list[int]:
    """
    Bring the database up to L{SCHEMA_VERSION}: each missing step in its own
    transaction (a failed step leaves the database at the step before).
    Returns the versions applied.
    """
    applied = []
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS popservice_schema ("
                       "version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())")
        connection.commit()
        version = current_version(cursor)
        connection.commit()
        if version > SCHEMA_VERSION:
            raise SchemaMismatch("database schema %d is newer than this popservice (%d)"
                                 % (version, SCHEMA_VERSION))
        for step, statements in MIGRATIONS:
            if step <= version:
                continue
            for statement in statements:
                cursor.execute(statement)
            cursor.execute("INSERT INTO popservice_schema (version) VALUES (%s)", (step,))
            connection.commit()
            applied.append(step)
    return applied


def check(cursor: Any) -> None:
    """Raise L{SchemaMismatch} unless the database is at L{SCHEMA_VERSION}."""
    version = current_version(cursor)
    if version != SCHEMA_VERSION:
        raise SchemaMismatch("database schema is at version %d, this popservice needs %d: "
                             "run 'popservice db upgrade'" % (version, SCHEMA_VERSION))
