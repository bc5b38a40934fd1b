"""
C{popservice expire}: the periodic job of RFC 2449 EXPIRE.

Removes messages that were first retrieved at least N days ago from every
user's mailbox (N from C{--days}, or per user from the passwd-file extra field
C{expire=N}).  Logins expire a user's own mailbox too; this job also clears
mailboxes of users who stopped logging in.  Run it from cron or a systemd
timer::

    popservice expire --mail maildir:/srv/mail/%u --passwd /etc/popservice/passwd --days 30

A mailbox in use is skipped (its session holds the lock) and done next time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet import defer, task

from popservice.interfaces import IExpiringMailbox, IMailStore, MailboxInUse, MailboxUnavailable


def days_for(record: Any, default: int | None) -> int | None:
    value = getattr(record, "extra", {}).get("expire")
    if value is None:
        return default
    return int(value) if str(value).isdigit() else None


@defer.inlineCallbacks
def expire_all(store: IMailStore, records: list[Any], default: int | None, now: float) -> Any:
    """Expire each user's mailbox; returns {user: removed count or a reason}."""
    results: dict[str, object] = {}
    for record in records:
        days = days_for(record, default)
        if days is None or days <= 0:
            continue
        try:
            mailbox = yield store.open_mailbox(record.user, record.home_directory)
        except MailboxInUse:
            results[record.user] = "in use, skipped"
            continue
        except MailboxUnavailable as e:
            results[record.user] = "unavailable (%s)" % (e,)
            continue
        try:
            if IExpiringMailbox.providedBy(mailbox):
                results[record.user] = yield mailbox.expire(days, now)
            else:
                results[record.user] = "store cannot expire"
        finally:
            yield mailbox.close()
    return results


def run(args: argparse.Namespace) -> None:
    from popservice.auth.passwdfile import PasswdFileChecker
    from popservice.tap import make_store

    store = make_store(args.mail, "exclusive")
    checker = PasswdFileChecker(args.passwd)
    records = list(checker.records())

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        results = yield expire_all(store, records, args.days, time.time())
        for user, outcome in sorted(results.items()):
            print("%s: %s" % (user, outcome if isinstance(outcome, str) else "%d expired" % outcome))

    task.react(main)  # exits the process with main's outcome


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser("expire", help="remove messages retrieved N days ago (RFC 2449 EXPIRE)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mail", required=True, help="mail store, e.g. maildir:/srv/mail/%%u")
    p.add_argument("--passwd", required=True, help="the passwd-file listing the users")
    p.add_argument("--days", type=int, default=None,
                   help="days after first retrieval (default: only users with an expire=N extra field)")
    p.set_defaults(func=run)
