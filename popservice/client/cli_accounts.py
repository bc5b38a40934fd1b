"""
C{popservice fetch --config FILE}: the accounts of a config file
(L{popservice.client.accounts}), fetched once -- one after another on the
blocking engine, at most C{--max-parallel} at once on the Twisted one
(C{--engine twisted}) -- or polled until stopped (C{--daemon INTERVAL},
L{popservice.client.daemon}, always the Twisted engine).

One account failing does not stop the others.  The summary has one line per
account, C{NAME: what happened}, ending in C{[status N]} when that account
did not end with 0 (warnings come before it, C{popservice: NAME: warning:
...}; C{-q} leaves out the lines of accounts that ended with 0).  The exit
status is 0 when every account succeeded, else the most severe of the
accounts' statuses: 2 (usage or configuration) over 1 (a permanent failure:
authentication, certificate, a message refused for good) over 75 (a
temporary one: network, server busy, journal locked, a message deferred by
the receiving server).  A config file that cannot be used is 2, before
anything is fetched.

Options given on the command line override every selected account's
settings (C{--keep}, C{--limit}, C{--to} ...: L{accounts.OVERRIDABLE});
the per-account ones (the URL, C{--user}, the password sources,
C{--state-dir}) are refused.
"""

from __future__ import annotations

import gc
import sys

from popservice.client import blocking
from popservice.client.accounts import (
    OVERRIDABLE,
    Account,
    AccountError,
    ConfigError,
    Outcome,
    load_accounts,
    prepare_fetch,
    select_accounts,
)
from popservice.client.cli_common import EX_USAGE, close_target, run_reactor, worst
from popservice.client.progress import Progress

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    import argparse
    from typing import Any

__all__ = ["fetch_blocking", "load_selected", "overrides", "run_accounts"]

#: options that name one account's mailbox or login: set per account in the file
_PER_ACCOUNT = {"user": "--user", "auth": "--auth", "password_env": "--password-env",
                "password_command": "--password-command", "netrc": "--netrc",
                "oauth_token_command": "--oauth-token-command", "state_dir": "--state-dir"}


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line that override the file's settings; ConfigError for the others."""
    given: set[str] = getattr(args, "given", None) or set()
    refused = [flag for dest, flag in _PER_ACCOUNT.items() if dest in given]
    if args.url:
        refused.insert(0, "a URL")
    if refused:
        raise ConfigError(f"with --config, {', '.join(refused)} belong in the file (per account)")
    out = {key: getattr(args, key) for key in OVERRIDABLE if key in given}
    if "recipient" in out:
        out["recipient"] = tuple(out["recipient"])
    return out


def load_selected(args: argparse.Namespace, strict: bool = True) -> dict[str, Account]:
    """
    The file's accounts, the C{--account} ones only when given.  Not
    C{strict} (a daemon re-reading its file): a selected account that is
    gone from the file is left out instead of being an error.
    """
    accounts = load_accounts(args.config, overrides(args))
    names = args.account or ()
    if not strict:
        names = [n for n in names if n in accounts]
        if args.account and not names:
            raise ConfigError(f"{args.config}: none of the selected accounts is left in the file")
    return select_accounts(accounts, names)


def fetch_blocking(account: Account, progress: Progress | None = None) -> Outcome:
    """One fetch of C{account} on the blocking engine; never raises."""
    try:
        prepared = prepare_fetch(account)
    except AccountError as e:
        return Outcome.of_error(account.name, e)
    options = prepared.options
    options.early_writeback = False  # measured faster for this engine (see FetchOptions)
    options.threaded_sync = True
    try:
        result = blocking.run_fetch(account.url, prepared.credentials, prepared.target, prepared.state_dir,
                                    options, progress, **account.connection_kwargs())
    except Exception as e:
        return Outcome.of_error(account.name, e, prepared.warnings)
    finally:
        close_target(prepared.target)
    return Outcome.of_result(account.name, result, prepared.warnings)


def _fetch_twisted(accounts: dict[str, Account], max_parallel: int) -> list[Outcome]:
    from twisted.internet import defer

    from popservice.client.daemon import poll_account

    outcomes: list[Outcome] = []

    def main(reactor: Any) -> defer.Deferred[int]:
        semaphore = defer.DeferredSemaphore(max_parallel)
        polls = [semaphore.run(poll_account, reactor, account) for account in accounts.values()]

        def done(results: list[Outcome]) -> int:
            outcomes.extend(results)
            return 0

        return defer.gatherResults(polls).addCallback(done)

    run_reactor(main)
    return outcomes


def _run_daemon(args: argparse.Namespace, accounts: dict[str, Account]) -> int:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from popservice.client.daemon import Daemon

    # the daemon's own events, and what else goes wrong (Twisted's info chatter is left out)
    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    levels.setLogLevelForNamespace("popservice.fetch", LogLevel.info)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr, timeFormat="%Y-%m-%dT%H:%M:%S.%f%z"),
                                    [levels])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    def main(reactor: Any) -> Any:
        daemon = Daemon(reactor, lambda strict: load_selected(args, strict), interval=args.daemon,
                        max_parallel=args.max_parallel)
        return daemon.run(accounts)

    return run_reactor(main)


def report(outcomes: list[Outcome], quiet: bool = False) -> int:
    """Warnings, then a line per account (on standard error); the exit status (the worst)."""
    for outcome in outcomes:
        for w in outcome.warnings:
            sys.stderr.write(f"popservice: {outcome.name}: warning: {w}\n")
    for outcome in outcomes:
        if outcome.status or not quiet:
            sys.stderr.write(outcome.line() + "\n")
    return worst(o.status for o in outcomes)


def run_accounts(args: argparse.Namespace) -> int:
    """C{fetch --config}'s handler: an exit status."""
    try:
        if args.max_parallel < 1:
            raise ConfigError("--max-parallel must be at least 1")
        accounts = load_selected(args)
    except ConfigError as e:
        sys.stderr.write(f"popservice: {e}\n")
        return EX_USAGE
    if args.daemon is not None:
        return _run_daemon(args, accounts)
    if args.engine == "twisted":
        return report(_fetch_twisted(accounts, args.max_parallel), args.quiet)
    gc.freeze()  # as the one-account fetch does (cli_fetch)
    outcomes = []
    for account in accounts.values():
        show = (args.progress or sys.stderr.isatty()) and not args.quiet
        outcomes.append(fetch_blocking(account, Progress(enabled=show)))
    return report(outcomes, args.quiet)
