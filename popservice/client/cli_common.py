"""
What every client subcommand's runner shares: the exit statuses, the message
and status for an error of either engine (L{describe_error}), the Twisted
reactor runner for the Twisted-based commands (L{run_reactor}, which imports
Twisted only when called), the connection options as keyword arguments, and
closing a delivery target.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

from popservice.client import blocking
from popservice.client.journal import StateLocked
from popservice.client.targets import DeliveryError

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from twisted.internet import defer

__all__ = [
    "EX_FAIL", "EX_OK", "EX_TEMPFAIL", "EX_USAGE", "close_target", "connection_kwargs",
    "describe_error", "describe_failure", "run_reactor",
]

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2
#: sysexits.h: try again later (IN-USE, SYS/TEMP, network)
EX_TEMPFAIL = 75


def describe_error(e: BaseException) -> tuple[str, int]:
    """A message and an exit status for an error of either engine."""
    if isinstance(e, blocking.POP3Error):
        return str(e), EX_TEMPFAIL if e.temporary else EX_FAIL
    if isinstance(e, blocking.TLSError):
        return f"TLS: {e}", EX_FAIL
    if isinstance(e, StateLocked):
        return str(e), EX_TEMPFAIL
    if isinstance(e, (blocking.POP3ClientError, DeliveryError)):
        return str(e), EX_FAIL
    if "twisted" in sys.modules:
        from twisted.internet.error import ConnectError, ConnectionLost, TimeoutError

        from popservice.client.protocol import POP3ClientError, POP3Error

        if isinstance(e, POP3Error):
            return str(e), EX_TEMPFAIL if e.temporary else EX_FAIL
        if isinstance(e, (ConnectError, ConnectionLost, TimeoutError)):
            return f"network: {e}", EX_TEMPFAIL
        if isinstance(e, POP3ClientError):
            return str(e), EX_FAIL
    if isinstance(e, OSError):
        return f"network: {e}", EX_TEMPFAIL
    if isinstance(e, ValueError):
        return str(e), EX_FAIL
    if type(e).__module__.startswith("OpenSSL"):
        return f"TLS: {e}", EX_FAIL
    return f"{type(e).__name__}: {e}", EX_FAIL


def describe_failure(f: Any) -> tuple[str, int]:
    """L{describe_error} for a Twisted Failure."""
    return describe_error(f.value)


def close_target(target: Any) -> None:
    """Close the descriptor a target may hold (the mbox file)."""
    fd = getattr(target, "fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)


def run_reactor(main: Callable[[Any], defer.Deferred[int]]) -> int:
    """Run C{main(reactor)} to completion on the global reactor; its int is the exit status."""
    from twisted.internet import defer
    from twisted.internet import reactor as _reactor
    from twisted.python.failure import Failure

    reactor: Any = _reactor
    status: list[int] = []

    def go() -> None:
        d = defer.maybeDeferred(main, reactor)

        def ok(code: int) -> None:
            status.append(code)

        def failed(f: Failure) -> None:
            text, code = describe_failure(f)
            sys.stderr.write(f"popservice: {text}\n")
            status.append(code)

        d.addCallbacks(ok, failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    return status[0] if status else EX_FAIL


def connection_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The connection options every subcommand parses, as keyword arguments of either engine's connect."""
    return {"starttls": args.starttls, "ca_file": args.ca_file, "insecure": args.insecure,
            "timeout": args.timeout}

