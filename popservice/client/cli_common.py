"""
What every client subcommand's runner shares: the exit statuses, the message
and status for an error of either engine (L{describe_error}) and for a
finished fetch (L{result_status}), the most severe of several (L{worst}),
the Twisted reactor runner for the Twisted-based commands (L{run_reactor},
which imports Twisted only when called), the connection options as keyword
arguments, closing a delivery target, and the size and duration syntax of
options and config files.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from collections.abc import Callable

from popservice.client.common import (
    AuthError,
    NoMechanismError,
    POP3ClientError,
    POP3Error,
    POP3ProtocolError,
    TLSError,
    TLSRequiredError,
)
from popservice.client.journal import StateLocked
from popservice.client.targets import DeliveryError
from popservice.sasl.client import SASLError

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from twisted.internet import defer

__all__ = [
    "EX_FAIL", "EX_OK", "EX_TEMPFAIL", "EX_USAGE", "close_target", "connection_kwargs",
    "describe_error", "describe_failure", "parse_duration", "parse_size", "result_status", "run_reactor",
    "worst",
]

EX_OK = 0
#: a permanent failure: a certificate that does not verify, authentication
#: failed, a server error that is not temporary, a protocol error, delivery
EX_FAIL = 1
#: a usage or configuration problem: bad options, no login method both sides
#: accept (a password in clear without --allow-plaintext, a mechanism the
#: server does not offer, an empty token), STLS required and not offered
EX_USAGE = 2
#: sysexits.h: try again later (network errors and timeouts, IN-USE,
#: LOGIN-DELAY, SYS/TEMP, the journal locked by another run)
EX_TEMPFAIL = 75

#: how bad each status is, for L{worst}: a usage or configuration problem
#: needs someone to edit something, a permanent failure needs someone to look,
#: a temporary one goes away by itself
_SEVERITY = {EX_OK: 0, EX_TEMPFAIL: 1, EX_FAIL: 2, EX_USAGE: 3}


def worst(statuses: Any) -> int:
    """The most severe of some exit statuses: 2 > 1 > 75 > 0 (L{EX_OK} when there are none)."""
    return max(statuses, key=lambda s: _SEVERITY.get(s, 2), default=EX_OK)


def result_status(result: Any) -> int:
    """
    A finished fetch's exit status: L{EX_FAIL} when a receiving server
    refused a message for good and it was kept, L{EX_TEMPFAIL} when one was
    refused for now (it is on the server for the next run), else L{EX_OK}.
    """
    if result.rejected and not result.rejected_dropped:
        return EX_FAIL
    if result.deferred:
        return EX_TEMPFAIL
    return EX_OK


def _network_problem(e: BaseException) -> str | None:
    """The words for a network failure of either engine (stdlib socket or Twisted), else None."""
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return "cannot resolve the host name"
    if isinstance(e, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return "connection lost"
    if isinstance(e, ConnectionError):  # the blocking engine's end of data
        return "connection closed by the server"
    if isinstance(e, OSError):
        return (e.strerror or str(e) or type(e).__name__).lower()
    if "twisted" in sys.modules:
        from twisted.internet import error

        if isinstance(e, error.TimeoutError):
            return "timed out"
        if isinstance(e, error.ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, error.DNSLookupError):
            return "cannot resolve the host name"
        if isinstance(e, error.ConnectionDone):
            return "connection closed by the server"
        if isinstance(e, error.ConnectionLost):
            return "connection lost"
        if isinstance(e, error.NoRouteError):
            return "no route to host"
        if isinstance(e, error.ConnectError):
            return str(e.osError or (e.args[0] if e.args else "") or "cannot connect").lower()
    return None


def describe_error(e: BaseException) -> tuple[str, int]:
    """
    A message and an exit status for an error of either engine: the same
    situation gives the same text and status whichever engine met it.

        TLS: certificate verification failed for HOST: REASON    EX_FAIL
        TLS: handshake with HOST failed: REASON                  EX_FAIL
        TLS: HOST does not offer STLS ...                        EX_USAGE
        network: connection refused / timed out / ...            EX_TEMPFAIL
        authentication failed: PASS: -ERR [AUTH] ...             EX_FAIL
        server: COMMAND: -ERR [CODE] ...                         EX_TEMPFAIL (temporary codes), EX_FAIL
        login: refusing to send the password in clear ...        EX_USAGE
    """
    if isinstance(e, StateLocked):
        return str(e), EX_TEMPFAIL
    if isinstance(e, AuthError):
        return f"authentication failed: {e}", EX_FAIL
    if isinstance(e, POP3Error):
        return f"server: {e}", EX_TEMPFAIL if e.temporary else EX_FAIL
    if isinstance(e, TLSRequiredError):
        return f"TLS: {e}", EX_USAGE
    if isinstance(e, TLSError):
        return f"TLS: {e}", EX_FAIL
    if isinstance(e, NoMechanismError):
        return f"login: {e}", EX_USAGE
    if isinstance(e, SASLError):
        return f"authentication failed: {e}", EX_FAIL
    if isinstance(e, POP3ProtocolError):
        return f"server: protocol error: {e}", EX_FAIL
    if isinstance(e, DeliveryError):
        return str(e), EX_TEMPFAIL if e.temporary else EX_FAIL
    if isinstance(e, POP3ClientError):
        return str(e), EX_FAIL
    problem = _network_problem(e)
    if problem is not None:
        return f"network: {problem}", EX_TEMPFAIL
    if isinstance(e, ValueError):
        return str(e), EX_FAIL
    if type(e).__module__.startswith("OpenSSL"):
        return f"TLS: {e}", EX_FAIL
    return f"{type(e).__name__}: {e}", EX_FAIL


def describe_failure(f: Any) -> tuple[str, int]:
    """L{describe_error} for a Twisted Failure."""
    return describe_error(f.value)


def close_target(target: Any) -> None:
    """Close the descriptor a target may hold (the mbox file) and drop its connection (forwarding)."""
    fd = getattr(target, "fd", None)
    if isinstance(fd, int) and fd >= 0:
        target.fd = -1  # closed once: the number may belong to another file later
        with contextlib.suppress(OSError):
            os.close(fd)
    disconnect = getattr(target, "disconnect", None)
    if disconnect is not None:
        with contextlib.suppress(Exception):
            disconnect()


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



# (patterns, not compiled at import: a fetch without --max-size or --daemon never needs them)
_SIZE = r"\s*([0-9]+)\s*([kKmMgG]?)(i?[bB])?\s*"
_DURATION = r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)?\s*"


def parse_size(text: str) -> int:
    """C{"20480"}, C{"20k"}, C{"16 MiB"}, C{"1G"} -> octets (ValueError otherwise)."""
    m = re.fullmatch(_SIZE, text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]


def parse_duration(text: str) -> float:
    """C{"300"}, C{"0.2"}, C{"250ms"}, C{"90s"}, C{"5m"}, C{"2h"}, C{"1d"} -> seconds, more than 0."""
    m = re.fullmatch(_DURATION, text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    seconds = float(m.group(1)) * {None: 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not seconds > 0:
        raise ValueError(f"a duration must be more than 0: {text!r}")
    return seconds
