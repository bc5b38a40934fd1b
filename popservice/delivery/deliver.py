"""
popservice deliver USER: one message from stdin into USER's mailbox, for
an MTA's mailbox command (Postfix mailbox_command, a pipe(8) service,
Exim's pipe transport) or a script::

    popservice deliver alice --mail maildir:/srv/mail/%u < message
    mailbox_command = /usr/local/bin/popservice deliver "$USER" --mail maildir:~/Maildir

Exit codes as sendmail and Postfix read them (sysexits.h):

 - 0 (EX_OK): stored, or stored before (the same idempotency key: a rerun
   after a lost exit status stores nothing twice);
 - 67 (EX_NOUSER): no such user (not in --passwd, no mailbox in the store);
 - 75 (EX_TEMPFAIL): the store cannot take it now, or the configuration is
   broken (the MTA keeps the message and retries, nothing bounces because of
   a typo in a command line);
 - 65 (EX_DATAERR): nothing on stdin, or more than --max-size octets.

A first line "From sender date" (the mbox envelope line local delivery
agents get) is dropped.  ~ in the store path is the home directory from
--passwd (a Dovecot passwd-file), else the system account's.

No server starts: the store's Deferred API runs under
twisted.internet.task.react, which only spins the reactor for the store's
threads, and nothing of the POP3 server is imported.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any, NoReturn

from twisted.internet import defer, task

from popservice.delivery.common import Trouble, classify
from popservice.delivery.key import delivery_key
from popservice.interfaces import IMailDelivery

__all__ = ["EX_DATAERR", "EX_NOUSER", "EX_OK", "EX_TEMPFAIL", "main", "open_store", "read_message"]

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_TEMPFAIL = 75

#: The default message size limit, as the LMTP server's: 50 MiB.
DEFAULT_MAX_SIZE = 50 * 1024 * 1024


class Refused(Exception):
    """Delivery ends with this exit status and message."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def open_store(description: str) -> IMailDelivery:
    """
    A delivering store from a C{--mail} description (C{maildir:TEMPLATE} or
    C{postgresql://...}, as C{twistd pop3 --mail} takes them); L{Refused}
    when it is unknown or cannot deliver.
    """
    kind = description.split(":", 1)[0]
    store: object
    try:
        if kind == "maildir":
            from popservice.stores.maildir import MaildirStore

            store = MaildirStore.from_description(description)
        elif kind in ("postgresql", "postgres"):
            from popservice.stores.postgres import PostgresStore

            store = PostgresStore.from_description(description)
        else:
            raise Refused(EX_TEMPFAIL, "unknown mail store %r (supported: maildir:PATH, postgresql://...)"
                          % (kind,))
    except (ValueError, ImportError) as e:
        raise Refused(EX_TEMPFAIL, "--mail: %s" % (e,))
    if not IMailDelivery.providedBy(store):
        raise Refused(EX_TEMPFAIL, "the mail store %r cannot deliver" % (kind,))
    return store


def read_message(stream: IO[bytes], max_size: int) -> bytes:
    """The message on C{stream}, without an mbox C{From } line; L{Refused} (65) if empty or too big."""
    data = stream.read(max_size + 1)
    if len(data) > max_size:
        raise Refused(EX_DATAERR, "message larger than %d octets" % (max_size,))
    if data.startswith(b"From "):
        end = data.find(b"\n")
        data = data[end + 1:] if end >= 0 else b""
    if not data.strip():
        raise Refused(EX_DATAERR, "no message on standard input")
    return data


def home_of(user: str, passwd: str | None) -> str | None:
    """C{user}'s home: from the passwd-file (L{Refused} 67 when not listed there), else the system's."""
    if passwd is None:
        import pwd

        try:
            return pwd.getpwnam(user).pw_dir or None
        except (KeyError, UnicodeEncodeError):
            return None
    from popservice.auth.passwdfile_format import parse_passwd_file

    try:
        with open(passwd, "rb") as f:
            records = parse_passwd_file(f.read(), passwd)
    except (OSError, ValueError) as e:
        raise Refused(EX_TEMPFAIL, "cannot read the passwd-file %s: %s" % (passwd, e))
    record = records.get(user)
    if record is None:
        raise Refused(EX_NOUSER, "no such user: %s" % (user,))
    return record.home_directory


async def deliver(store: IMailDelivery, user: str, home: str | None, message: bytes) -> bool:
    """Store C{message} for C{user}; C{False} when it was stored before.  L{Refused} otherwise."""
    try:
        if not (await store.exists(user, home)):
            raise Refused(EX_NOUSER, "no such user: %s" % (user,))
        stored: bool = await store.deliver(user, home, message, delivery_key(message))
    except Refused:
        raise
    except Exception as e:
        trouble = classify(e)
        status = EX_NOUSER if trouble is Trouble.NO_MAILBOX else EX_TEMPFAIL
        detail = "" if trouble is Trouble.UNEXPECTED else ": %s" % (e,)
        raise Refused(status, "%s%s" % (trouble.value, detail)) from e
    return stored


def _log_warnings_to(stream: IO[str]) -> None:
    """The store's warnings (the reason behind a temporary failure) go to stderr, for the MTA's log."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(stream), [predicate])],
                                     redirectStandardIO=False)


def main(user: str, mail: str, passwd: str | None, max_size: int = DEFAULT_MAX_SIZE,
         stdin: IO[bytes] | None = None, stderr: IO[str] | None = None) -> NoReturn:
    """Run C{popservice deliver}: exits the process with one of the codes above."""
    err = sys.stderr if stderr is None else stderr
    source = sys.stdin.buffer if stdin is None else stdin

    def fail(status: int, why: str) -> NoReturn:
        err.write("popservice deliver: %s\n" % (why,))
        err.flush()
        raise SystemExit(status)

    try:
        message = read_message(source, max_size)
        if passwd is not None:
            passwd = os.path.abspath(passwd)
        home = home_of(user, passwd)
        store = open_store(mail)
    except Refused as e:
        fail(e.status, str(e))
    _log_warnings_to(err)

    async def run(reactor: Any) -> None:
        try:
            stored = await deliver(store, user, home, message)
        except Refused as e:
            fail(e.status, str(e))
        if not stored:
            err.write("popservice deliver: already stored (same message delivered before)\n")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    raise SystemExit(EX_OK)  # not reached: react exits


def run_command(args: Any) -> NoReturn:
    """The C{popservice deliver} handler (argparse arguments from L{popservice.cli})."""
    main(args.user, args.mail, args.passwd, args.max_size)
