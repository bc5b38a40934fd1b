"""
C{popservice fetch --config FILE --daemon INTERVAL}: poll every account of
the config file on its own schedule, many at once, in one process on the
Twisted engine (L{poll_account} is one fetch of one account; the one-shot
C{fetch --config --engine twisted} uses it too).

Scheduling rules (L{Daemon}):

 - every account is polled when the daemon starts, then INTERVAL after the
   end of its previous poll (the account's C{interval}, else C{--daemon}'s);
 - a poll fails when it ends with any status but 0 (the statuses of
   C{popservice fetch}: network, login, TLS, a message the receiving server
   deferred or refused ...); after C{n} failures in a row the next poll comes
   C{min(interval * 2**n, cap) * uniform(0.8, 1.2)} after the end of the last
   one, C{cap} being the account's C{max_backoff}, else one hour, but never
   less than its interval; a poll that succeeds resets C{n};
 - one account is never polled twice at once (its next poll is scheduled
   only when the last one has ended), and at most C{--max-parallel} polls
   (default 4) run at once: an account that comes due meanwhile waits for a
   slot, in the order they came due;
 - SIGTERM (or SIGINT): no new polls; a poll under way sends no new RETR,
   and what it has received is made durable, recorded and DELE'd (the
   crash-safe unit) before its QUIT; then the daemon exits 0.  A second
   SIGTERM/SIGINT exits at once with 75 (crash-safe all the same: the next
   start recovers);
 - SIGHUP: the config file is read again.  New accounts are polled at once;
   removed ones are not polled again (a poll under way finishes); an
   account whose settings changed takes them at its next poll, which is
   moved to INTERVAL (the new one) after the end of its last poll unless it
   is backing off.  A file that cannot be read or checked is reported and the
   accounts run on as they were.

It logs through twisted.logger (namespace C{popservice.fetch}), every event
with fields: C{account}, C{event} (C{started}, C{poll_ok}, C{poll_failed},
C{backoff}, C{warning}, C{account_added}, C{account_removed},
C{account_changed}, C{reloaded}, C{reload_failed}, C{stopping}, C{stopped}),
and per event C{fetched}, C{bytes}, C{deleted}, C{stopped} (the poll was cut
short by SIGTERM), C{status}, C{error}, C{failures}, C{delay}, C{next_poll}
(a local ISO time) and C{next_poll_ts} (Unix time); the text form (standard
error) is C{key=value} pairs after a timestamp with microseconds.
"""

from __future__ import annotations

import datetime
import random
import signal
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from popservice.client.accounts import Account, Outcome, prepare_fetch
from popservice.client.cli_common import EX_FAIL, EX_OK, EX_TEMPFAIL, close_target
from popservice.client.connect import connect
from popservice.client.fetch import fetch

__all__ = ["DEFAULT_MAX_BACKOFF", "JITTER", "Daemon", "poll_account"]

log = Logger(namespace="popservice.fetch")

#: the longest wait after failures when an account sets no max_backoff (never less than its interval)
DEFAULT_MAX_BACKOFF = 3600.0
#: a wait after a failure is multiplied by a random factor in [1 - JITTER, 1 + JITTER]
JITTER = 0.2
#: 2**n stops growing here (the cap is reached long before)
_MAX_EXPONENT = 30


@defer.inlineCallbacks
def poll_account(reactor: Any, account: Account, stop: Callable[[], bool] | None = None) -> Any:
    """
    One fetch of C{account} on the Twisted engine: credentials and target
    prepared in a thread (their commands block), then connect, fetch, QUIT.
    Fires with an L{Outcome}; never fails.  C{stop}: see L{FetchOptions.stop}.
    """
    try:
        prepared = yield threads.deferToThread(prepare_fetch, account, stop)
    except Exception as e:
        return Outcome.of_error(account.name, e)
    client = None
    try:
        client = yield connect(reactor, account.url, prepared.credentials, **account.connection_kwargs())
        result = yield fetch(client, prepared.target, prepared.state_dir, prepared.options)
    except Exception as e:
        if client is not None:
            client.abort()  # nothing is deleted: the server deletes only after a QUIT
        return Outcome.of_error(account.name, e, prepared.warnings)
    finally:
        close_target(prepared.target)
    return Outcome.of_result(account.name, result, prepared.warnings)


def _local_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="milliseconds")


class _Slot:
    """One account's place in the schedule."""

    __slots__ = ("account", "call", "failures", "last_end", "queued", "removed", "running")

    def __init__(self, account: Account) -> None:
        self.account = account
        #: consecutive failed polls
        self.failures = 0
        #: the timer of the next poll
        self.call: Any = None
        #: due, waiting for a free connection slot
        self.queued = False
        #: the poll under way
        self.running: defer.Deferred[Any] | None = None
        #: the reactor time its last poll ended
        self.last_end: float | None = None
        #: gone from the config file: not polled again
        self.removed = False

    def cancel(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


class Daemon:
    """
    The scheduler (rules in the module docstring).  C{load(strict)} reads the
    config file again (SIGHUP; C{strict} False: see
    L{popservice.client.cli_accounts.load_selected}); C{poll(reactor,
    account, stop)} is one fetch (L{poll_account}); C{rand} gives the
    jitter's random numbers in [0, 1).
    """

    def __init__(self, reactor: Any, load: Callable[[bool], dict[str, Account]], interval: float,
                 max_parallel: int = 4, *,
                 poll: Callable[[Any, Account, Callable[[], bool]], defer.Deferred[Outcome]] = poll_account,
                 rand: Callable[[], float] = random.random, max_backoff: float = DEFAULT_MAX_BACKOFF,
                 install_signals: bool = True) -> None:
        if not interval > 0:
            raise ValueError("the interval must be more than 0 seconds")
        self.reactor = reactor
        self.load = load
        self.interval = interval
        self.max_parallel = max_parallel
        self.max_backoff = max_backoff
        self._poll_one = poll
        self._rand = rand
        self._install = install_signals
        self._semaphore = defer.DeferredSemaphore(max_parallel)
        self.slots: dict[str, _Slot] = {}
        self.stopping = False
        self._done: defer.Deferred[int] = defer.Deferred()
        self._previous_handlers: dict[int, Any] = {}

    # -- life ----------------------------------------------------------------

    def run(self, accounts: dict[str, Account] | None = None) -> defer.Deferred[int]:
        """Start polling C{accounts} (else C{load(True)}'s); fires with the exit status once stopped."""
        if accounts is None:
            accounts = self.load(True)
        if self._install:
            self._install_signals()
        log.info("account=- event=started accounts={accounts} interval={interval} "
                 "max_parallel={max_parallel}", account="-", event="started", accounts=",".join(accounts),
                 interval=self.interval, max_parallel=self.max_parallel)
        for name, account in accounts.items():
            self._add(name, account)
        return self._done

    def stop(self) -> None:
        """SIGTERM: finish what runs (its current batch), start nothing new, then fire with 0."""
        if self.stopping:
            log.warn("account=- event=stopping_now", account="-", event="stopping_now")
            self._finish(EX_TEMPFAIL)
            return
        self.stopping = True
        for slot in self.slots.values():
            slot.cancel()
        running = [name for name, slot in self.slots.items() if slot.running is not None]
        log.info("account=- event=stopping running={running}", account="-", event="stopping",
                 running=",".join(running) or "-")
        self._check_stopped()

    def _check_stopped(self) -> None:
        if self.stopping and all(slot.running is None for slot in self.slots.values()):
            self._finish(EX_OK)

    def _finish(self, status: int) -> None:
        if self._done.called:
            return
        self._restore_signals()
        log.info("account=- event=stopped status={status}", account="-", event="stopped", status=status)
        self._done.callback(status)

    def _install_signals(self) -> None:
        def term(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.stop)

        def hup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        for signum, handler in ((signal.SIGTERM, term), (signal.SIGINT, term), (signal.SIGHUP, hup)):
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def _restore_signals(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    # -- the schedule --------------------------------------------------------

    def interval_of(self, account: Account) -> float:
        return account.interval or self.interval

    def backoff(self, slot: _Slot) -> float:
        """The wait after C{slot.failures} failures in a row (jittered)."""
        interval = self.interval_of(slot.account)
        cap = max(interval, slot.account.settings.get("max_backoff") or self.max_backoff)
        base = min(interval * 2 ** min(slot.failures, _MAX_EXPONENT), cap)
        return float(base * (1 - JITTER + 2 * JITTER * self._rand()))

    def _add(self, name: str, account: Account) -> None:
        slot = _Slot(account)
        self.slots[name] = slot
        self._schedule(slot, 0.0)

    def _schedule(self, slot: _Slot, delay: float) -> float:
        """Poll C{slot} after C{delay} seconds; returns the wall-clock time of that poll."""
        slot.cancel()
        slot.call = self.reactor.callLater(max(0.0, delay), self._due, slot)
        return time.time() + max(0.0, delay)

    def _due(self, slot: _Slot) -> None:
        slot.call = None
        if self.stopping or slot.removed or slot.running is not None or slot.queued:
            return
        slot.queued = True
        self._semaphore.run(self._poll, slot)

    def _poll(self, slot: _Slot) -> defer.Deferred[Any]:
        slot.queued = False
        if self.stopping or slot.removed:
            self._forget(slot)
            return defer.succeed(None)
        d = self._poll_one(self.reactor, slot.account, lambda: self.stopping)
        slot.running = d
        d.addBoth(self._polled, slot)
        return d

    def _polled(self, outcome: Outcome | Failure, slot: _Slot) -> None:
        slot.running = None
        slot.last_end = self.reactor.seconds()
        name = slot.account.name
        if isinstance(outcome, Failure):  # poll_account never fails; another poll function might
            log.failure("account={account} event=poll_crashed", outcome, account=name, event="poll_crashed")
            outcome = Outcome(name, EX_FAIL, error=outcome.getErrorMessage())
        result = outcome.result
        fields: dict[str, Any] = {
            "account": name, "status": outcome.status,
            "fetched": result.fetched if result is not None else 0,
            "bytes": result.bytes if result is not None else 0,
            "deleted": result.deleted if result is not None else 0,
            "stopped": "yes" if result is not None and result.stopped else "no",
        }
        for warning in outcome.warnings:
            log.warn("account={account} event=warning warning={warning!r}", account=name, event="warning",
                     warning=warning)
        if outcome.status == EX_OK:
            slot.failures = 0
            delay = self.interval_of(slot.account)
        else:
            slot.failures += 1
            delay = self.backoff(slot)
        again = not (self.stopping or slot.removed)
        next_poll = self._schedule(slot, delay) if again else None
        when = {"next_poll": _local_time(next_poll) if next_poll is not None else "-",
                "next_poll_ts": round(next_poll, 3) if next_poll is not None else None}
        if outcome.status == EX_OK:
            log.info("account={account} event=poll_ok fetched={fetched} bytes={bytes} deleted={deleted} "
                     "stopped={stopped} next_poll={next_poll}", event="poll_ok", **fields, **when)
        else:
            log.warn("account={account} event=poll_failed status={status} fetched={fetched} bytes={bytes} "
                     "failures={failures} error={error!r}", event="poll_failed", failures=slot.failures,
                     error=outcome.error or (result.summary() if result is not None else ""), **fields)
            if again:
                log.info("account={account} event=backoff failures={failures} delay={delay:.3f} "
                         "next_poll={next_poll}", account=name, event="backoff", failures=slot.failures,
                         delay=delay, **when)
        if self.stopping:
            self._check_stopped()
        elif slot.removed:
            self._forget(slot)

    def _forget(self, slot: _Slot) -> None:
        name = slot.account.name
        if slot.removed and self.slots.get(name) is slot:
            del self.slots[name]

    # -- SIGHUP --------------------------------------------------------------

    def reload(self) -> None:
        """Read the config file again (see the module docstring)."""
        if self.stopping:
            return
        try:
            accounts = self.load(False)
        except Exception as e:
            log.error("account=- event=reload_failed error={error!r}", account="-", event="reload_failed",
                      error=str(e))
            return
        for name, slot in list(self.slots.items()):
            if name in accounts or slot.removed:
                continue
            slot.removed = True
            slot.cancel()
            busy = slot.running is not None or slot.queued
            log.info("account={account} event=account_removed polling={polling}", account=name,
                     event="account_removed", polling="yes" if busy else "no")
            if not busy:
                self._forget(slot)
        now = self.reactor.seconds()
        for name, account in accounts.items():
            existing = self.slots.get(name)
            if existing is None:
                log.info("account={account} event=account_added", account=name, event="account_added")
                self._add(name, account)
                continue
            slot = existing
            revived, slot.removed = slot.removed, False
            changed = slot.account != account
            slot.account = account
            if revived:
                log.info("account={account} event=account_added", account=name, event="account_added")
            if changed:
                log.info("account={account} event=account_changed", account=name, event="account_changed")
            if slot.running is None and not slot.queued and (
                    slot.call is None or (changed and slot.failures == 0)):
                delay = slot.last_end + self.interval_of(account) - now if slot.last_end is not None else 0.0
                self._schedule(slot, delay)
        log.info("account=- event=reloaded accounts={accounts}", account="-", event="reloaded",
                 accounts=",".join(accounts))
