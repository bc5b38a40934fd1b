"""
L{PostgresWorld}: the interop world of L{tests.interop.world} with its mail in
a PostgreSQL store (a private server, tests/pg.py) instead of Maildirs, so the
same real-client tests run against C{twistd pop3 --mail postgresql://...}.
Several worlds may share one database: front ends of one cluster.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from popservice.stores.postgres.store import _deliver, normalise
from tests import pg
from tests.interop.world import Message, User, World

#: a short lease, so a killed front end's mailboxes are free within seconds
LEASE_TTL = 2.0


class PostgresWorld(World):
    def __init__(self, name: str, extra_args: Iterable[str] = (), url: str | None = None) -> None:
        super().__init__(name, extra_args)
        self.url = url or pg.fresh_database()

    def add_user(self, name: str, password: str, messages: Iterable[tuple[str, bytes]] = ()) -> User:
        user = User(name, password)
        self.users[name] = user
        with psycopg.connect(self.url) as conn, conn.cursor() as cursor:
            for i, (tag, stored) in enumerate(messages, start=1):
                chunks, size = normalise(stored)
                _deliver(cursor, name, chunks, size, None, None)
                cursor.execute("SELECT currval('messages_id_seq')")
                message_id = cursor.fetchone()[0]
                # rel holds the message's row id (there are no files)
                user.messages.append(Message(name, i, tag, stored, "%s-%d" % (name, i), str(message_id)))
            conn.commit()
        self._write_passwd()
        return user

    def present(self, user: str) -> list[int]:
        with psycopg.connect(self.url) as conn:
            rows = conn.execute("SELECT m.id FROM messages m JOIN mailboxes b ON b.id = m.mailbox_id "
                                "WHERE b.name = %s", (user,)).fetchall()
        ids = {str(row[0]) for row in rows}
        return [m.number for m in self.users[user].messages if m.rel in ids]

    def files(self, user: str) -> dict[str, str]:
        raise NotImplementedError("a PostgreSQL world has no message files")

    def command_line(self) -> list[str]:
        argv = super().command_line()
        argv[argv.index("--mail") + 1] = self.url
        return argv + ["--lease-ttl", str(LEASE_TTL)]
