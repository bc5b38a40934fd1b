"""
Users in PostgreSQL: C{--auth postgresql://user@host/db} checks credentials
against the C{users} table of the popservice schema (L{popservice.database.schema})::

    name      text     the login name
    password  text     as in a passwd-file: {SCHEME}secret (every scheme
                       popservice knows: ARGON2ID, SHA512-CRYPT, SCRAM-SHA-256 ...)
    home      text     the home directory (for ~ in --mail maildir:~/Maildir)
    extra     jsonb    the passwd-file's extra fields: {"nologin": true,
                       "login_delay": 60, "expire": 30, "scram_sha256": "..."}

The rows become the same records a passwd-file gives (L{PasswdRecord}), so
every scheme, APOP, CRAM-MD5, SCRAM secrets for SASL, C{nologin}, LOGIN-DELAY
and EXPIRE work unchanged (L{RecordChecker}).  The table is read whole at
start-up and again every C{refresh} seconds in the database's thread pool
(never on the reactor); a failed refresh keeps the last good copy.  This
suits sites up to some hundred thousand users; a per-login query would be
the next step beyond that.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.cred.strcred import ICheckerFactory, InvalidAuthArgumentString
from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer  # type: ignore[import-untyped,unused-ignore]

from popservice.auth.hashing import run_hashing
from popservice.auth.passwdfile_format import PasswdRecord, parse_passwd_line
from popservice.auth.schemes import PasswdFileError
from popservice.auth.userdb import RecordChecker
from popservice.database.pool import Database

log = Logger()

_SELECT = "SELECT name, password, home, extra FROM users ORDER BY name"


def _extra_fields(extra: Any) -> str:
    """jsonb extra fields as the passwd-file's C{key=value} list; C{true} is a bare flag."""
    if isinstance(extra, str):
        extra = json.loads(extra)
    if not isinstance(extra, dict):
        return ""
    out = []
    for key, value in extra.items():
        if value is True:
            out.append(str(key))
        elif value is not None and value is not False:
            out.append("%s=%s" % (key, value))
    return " ".join(out)


def records_from_rows(rows: list[tuple[Any, ...]]) -> dict[str, PasswdRecord]:
    """C{users} rows -> records; a malformed row is logged (never its secret) and skipped."""
    records: dict[str, PasswdRecord] = {}
    for number, (name, password, home, extra) in enumerate(rows, 1):
        line = "%s:%s::::%s::%s" % (name, password or "", home or "", _extra_fields(extra))
        try:
            record = parse_passwd_line(line, number)
        except PasswdFileError as e:
            log.warn("users table: row {n} ({user!r}) skipped: {why}", n=number, user=name, why=str(e))
            continue
        if record is not None:
            records[record.user] = record
    return records


def _load(cursor: Any) -> list[tuple[Any, ...]]:
    cursor.execute(_SELECT)
    return list(cursor.fetchall())


class PostgresUserChecker(RecordChecker):
    """A L{RecordChecker} over the C{users} table, refreshed every C{refresh} seconds."""

    def __init__(self, url: str, *, refresh: float = 30.0,
                 run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] = run_hashing,
                 db: Database | None = None) -> None:
        super().__init__(run_in_thread=run_in_thread)
        self.url = url
        self.db = db if db is not None else Database(url, max_connections=2)
        self.refresh_interval = refresh

    @property
    def source(self) -> str:
        return "users table"

    def load_now(self) -> None:
        """Read the table synchronously (start-up, before the reactor serves anyone)."""
        import psycopg

        with psycopg.connect(self.url, connect_timeout=10) as conn, conn.cursor() as cursor:
            self.set_records(records_from_rows(_load(cursor)))
        log.info("users table: {count} users", count=len(self._records))

    def refresh(self) -> "defer.Deferred[None]":
        """
        Re-read the table in the pool's thread, where the rows also become
        records (some hundred thousand rows take seconds: never on the
        reactor); on failure keep the last good copy.  Unchanged records keep
        their version (L{records_version}), so an auth cache keeps its entries.
        """
        def read(cursor: Any) -> dict[str, PasswdRecord] | None:
            records = records_from_rows(_load(cursor))
            return None if records == self._records else records

        def loaded(records: dict[str, PasswdRecord] | None) -> None:
            if records is not None:
                self.set_records(records)

        def failed(failure: Any) -> None:
            log.warn("users table: refresh failed, keeping {count} users: {why}", count=len(self._records),
                     why=failure.getErrorMessage())

        return self.db.run(read).addCallbacks(loaded, failed)

    def refresher(self) -> Any:
        """A service refreshing the records every C{refresh} seconds while it runs."""
        from twisted.application.internet import TimerService

        return TimerService(self.refresh_interval, self.refresh)


_HELP = """
Authenticate against the users table of popservice's PostgreSQL schema
(created by 'popservice db upgrade'): name, password ({SCHEME}secret, every
scheme the passwd-file knows), home, extra (jsonb: nologin, login_delay,
expire, scram_sha256 ...).  Example: --auth postgresql://pop@db.example/mail
"""


@implementer(ICheckerFactory, IPlugin)
class PostgresUserCheckerFactory:
    """strcred factory: C{--auth postgresql://user@host/db}."""

    authType = "postgresql"
    authHelp = _HELP
    argStringFormat = "//user@host[:port]/dbname (a libpq URL without its 'postgresql:')"
    credentialInterfaces = PostgresUserChecker.credentialInterfaces

    def generateChecker(self, argstring: str) -> PostgresUserChecker:
        if not argstring.startswith("//"):
            raise InvalidAuthArgumentString("postgresql: expects a URL, e.g. postgresql://pop@localhost/mail")
        checker = PostgresUserChecker("postgresql:" + argstring)
        try:
            checker.load_now()
        except Exception as e:
            raise InvalidAuthArgumentString("postgresql: cannot read the users table: %s" % (str(e).strip(),))
        # The refreshes run from the server's service (popservice.tap), not from here.
        return checker
