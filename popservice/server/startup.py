"""
What C{twistd pop3} checks before it starts, and how it reports what it
cannot start.

Every option is checked while the options are parsed (L{check_options},
called from C{popservice.tap.Options.postOptions}): twistd then prints the
usage and one line naming the problem, never a traceback.  Endpoint strings
are parsed as Twisted will parse them, without listening.  What only
binding can tell (the port is in use, permission denied) is reported by
L{ListeningServices}: one log line naming the endpoint, then exit status 1,
as twistd itself does when it cannot switch to C{--uid}.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet import endpoints, error
from twisted.logger import Logger

from popservice.server.quirks import parse_quirks

__all__ = ["ListeningServices", "check_options", "endpoint_problem", "mail_problem", "passwd_uid"]

log = Logger(namespace="popservice.startup")

#: numeric options: (the lowest value, whether the lowest value itself is allowed)
NUMBER_RANGES: dict[str, tuple[float, bool]] = {
    "timeout": (0, False),
    "login-timeout": (0, True),
    "lease-ttl": (0, False),
    "lock-grace": (0, True),
    "failure-delay": (0, True),
    "max-failures": (1, True),
    "max-sessions-per-user": (1, True),
    "max-connections": (1, True),
    "max-connections-per-ip": (1, True),
    "handshake-timeout": (0, True),
    "login-delay": (0, True),
    "auth-cache-ttl": (0, True),
    "auth-cache-negative-ttl": (0, True),
    "auth-cache-size": (1, True),
}

#: options naming endpoints to listen on (each a list, or one string, or None)
ENDPOINT_OPTIONS = ("listen", "listen-tls", "lmtp", "metrics")


def _why(e: BaseException) -> str:
    """An exception as the end of one log line."""
    if isinstance(e, error.CannotListenError) and e.socketError is not None:
        cause = e.socketError
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        return str(cause)
    if isinstance(e, OSError) and e.strerror:
        # os.symlink(pid, lock) (a unix: listener's lock file) names the link second
        name = e.filename2 if e.filename2 is not None else e.filename
        return "%s: %s" % (e.strerror, name) if name is not None else e.strerror
    return str(e) or type(e).__name__


def endpoint_problem(description: str, reactor: Any = None) -> str | None:
    """
    What is wrong with the endpoint string C{description} (its kind, its
    arguments, a port out of range, an C{ssl:} certificate and key that are
    unreadable or do not match), or None.  Nothing is bound.
    """
    if reactor is None:
        from twisted.internet import reactor
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except (IndexError, KeyError) as e:
        if description.split(":", 1)[0].lower() == "systemd":
            return "no such socket from systemd (not started by a systemd socket unit?): %s" % (_why(e),)
        return _why(e)
    except Exception as e:  # anything a parser or a file throws
        return _why(e)
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return "port %d is out of range (0-65535)" % (port,)
    context = getattr(endpoint, "_sslContextFactory", None)
    if context is not None and hasattr(context, "getContext"):
        try:
            context.getContext()  # checks that the private key matches the certificate
        except Exception as e:
            return "certificate and key cannot be used together: %s" % (_why(e),)
    return None


def mail_problem(description: str) -> str | None:
    """What is wrong with a C{--mail} description (its kind, a Maildir template's shape), or None."""
    kind = description.split(":", 1)[0]
    if kind == "maildir":
        from popservice.stores.maildir import MaildirStore

        try:
            MaildirStore.from_description(description)
        except ValueError as e:
            return str(e)
        return None
    if kind in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is None:
            return "postgresql:// needs psycopg: pip install 'popservice[postgresql]'"
        return None
    return "unknown mail store %r (supported: maildir:TEMPLATE, postgresql://...)" % (kind,)


def _number_problem(name: str, value: object) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    lowest, allowed = NUMBER_RANGES[name]
    if not math.isfinite(value):
        return "--%s must be a finite number" % (name,)
    if value < lowest or (value == lowest and not allowed):
        return "--%s must be %s %s, not %s" % (name, "at least" if allowed else "above", lowest, value)
    return None


def check_options(options: Any) -> None:
    """
    Check the options of C{twistd pop3} that C{postOptions} does not check
    itself; C{ValueError} with one line naming the first problem.
    C{client-quirks} becomes a frozenset of names.
    """
    for name in NUMBER_RANGES:
        problem = _number_problem(name, options.get(name))
        if problem is not None:
            raise ValueError(problem)
    problem = mail_problem(options["mail"])
    if problem is not None:
        raise ValueError("--mail %s: %s" % (options["mail"], problem))
    if not options["mail"].startswith("maildir:"):
        for flag in ("allow-mail-symlinks", "ignore-mail-owner"):
            if options.get(flag):
                raise ValueError("--%s applies to --mail maildir:... only" % (flag,))
    for name in ENDPOINT_OPTIONS:
        if name != "metrics" and options.get("worker-fds") is not None:
            continue  # a worker of --workers N: its parent checked and bound these (systemd: too)
        value = options.get(name)
        for description in ([value] if isinstance(value, str) else value or []):
            problem = endpoint_problem(description)
            if problem is not None:
                raise ValueError("--%s %s: %s" % (name, description, problem))
    if bool(options.get("trace-user")) != bool(options.get("trace-dir")):
        raise ValueError("--trace-user and --trace-dir go together")
    if options.get("trace-bodies") and not options.get("trace-user"):
        raise ValueError("--trace-bodies needs --trace-user")
    if options.get("trace-dir") and not os.path.isdir(options["trace-dir"]):
        raise ValueError("--trace-dir %s: no such directory" % (options["trace-dir"],))
    try:
        options["client-quirks"] = parse_quirks(options.get("client-quirks") or "")
    except ValueError as e:
        raise ValueError("--client-quirks: %s" % (e,)) from None


def passwd_uid(checkers: Iterable[Any]) -> Callable[[str], str | None] | None:
    """
    The uid field of a user's record (passwd-file, PostgreSQL users) from the
    first checker that knows the user, for the Maildir owner check; None when
    no checker keeps records.
    """
    keeping = [c for c in checkers if callable(getattr(c, "record", None))]
    if not keeping:
        return None

    def uid(user: str) -> str | None:
        for checker in keeping:
            record = checker.record(user)
            if record is not None:
                value = getattr(record, "uid", None)
                return str(value) if value not in (None, "") else None
        return None

    return uid


class ListeningServices(service.MultiService):
    """
    The top service of C{twistd pop3}: a listener added with L{listen} that
    cannot bind is one log line (C{cannot listen on tcp:110: Permission
    denied}) and exit status 1, not a traceback.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.descriptions: dict[service.IService, str] = {}

    def addService(self, child: service.IService) -> None:
        super().addService(child)  # type: ignore[no-untyped-call]

    def listen(self, description: str, listener: service.IService) -> None:
        """Add C{listener}, which listens on the endpoint string C{description}."""
        self.descriptions[listener] = description
        listener.setServiceParent(self)

    def _start(self, child: service.IService, start: Callable[[], object], privileged: bool) -> None:
        try:
            start()
        except Exception as e:
            description = self.descriptions.get(child)
            if description is not None:
                log.critical("cannot listen on {endpoint}: {why}", endpoint=description, why=_why(e))
            elif isinstance(e, error.CannotListenError):
                # a listener added without its endpoint string (--metrics): Twisted's text names the address
                log.critical("cannot listen: {why}", why=str(e))
            else:
                raise
            if privileged:
                # twistd: before the reactor runs; exit as twistd does when it cannot set --uid.
                raise SystemExit(1) from None
            raise

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        for child in self:
            self._start(child, child.privilegedStartService, True)

    def startService(self) -> None:
        service.Service.startService(self)
        for child in self:
            self._start(child, child.startService, False)
