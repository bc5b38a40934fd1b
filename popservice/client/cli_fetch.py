"""
C{popservice fetch}: run a fetch with the options C{popservice.client.cli}
parsed, on the blocking engine (L{popservice.client.blocking}, the default)
or the Twisted one (C{--engine twisted}, L{popservice.client.fetch}), and
report what it did.  C{--config} hands over to
L{popservice.client.cli_accounts} (imported only then).
"""

from __future__ import annotations

import gc
import os
import sys
import zlib
from collections.abc import Callable

# The default fetch path (the blocking engine) must not import Twisted: it
# costs about as much start-up time as a whole fetch.  Twisted is imported
# inside the function that needs it (fetch --engine twisted).
from popservice.client import blocking
from popservice.client.cli_common import (
    EX_USAGE,
    close_target,
    connection_kwargs,
    describe_error,
    result_status,
    run_reactor,
)
from popservice.client.cli_credentials import resolve_credentials
from popservice.client.delivery import FetchOptions, Progress, make_target
from popservice.client.journal import default_state_dir
from popservice.client.url import parse_url

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from popservice.client.common import Credentials

__all__ = ["default_state_dir", "run_fetch"]


def run_fetch(args: argparse.Namespace) -> int:
    """The C{fetch} subcommand's handler: an exit status."""
    if getattr(args, "config", None):
        from popservice.client.cli_accounts import run_accounts

        return run_accounts(args)
    problem = None
    if getattr(args, "account", None) or getattr(args, "daemon", None):
        problem = "--account and --daemon need --config FILE"
    elif not args.url or not args.to:
        problem = "fetch needs a URL and --to TARGET (or --config FILE)"
    if problem:
        sys.stderr.write(f"popservice: {problem}\n")
        return EX_USAGE
    url = parse_url(args.url)
    creds = resolve_credentials(args, url)
    state_dir = (os.path.expanduser(args.state_dir) if args.state_dir
                 else default_state_dir(url, creds.username))
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    warnings: list[str] = []
    # our tmp/ files' mark (zlib, not hashlib: hashlib costs OpenSSL's start-up)
    tag = "%08x" % zlib.crc32(state_dir.encode())
    target = make_target(args.to, username=creds.username, state_dir=state_dir, crlf=args.crlf,
                         warn=warnings.append, tag=tag, sync=args.sync,
                         recipients=getattr(args, "recipient", None) or (), timeout=args.timeout)
    progress = Progress(enabled=(args.progress or sys.stderr.isatty()) and not args.quiet)
    options = FetchOptions(keep=args.keep, limit=args.limit, max_size=args.max_size, window=args.window,
                           batch_messages=max(1, args.batch), on_reject=getattr(args, "on_reject", "keep"))

    def report(result: Any) -> int:
        for w in warnings + result.warnings:
            sys.stderr.write(f"popservice: warning: {w}\n")
        if not args.quiet:
            sys.stderr.write(result.summary() + "\n")
        return result_status(result)

    if getattr(args, "engine", "blocking") == "twisted":
        return _run_fetch_twisted(args, creds, target, state_dir, options, progress, report)
    options.early_writeback = False  # measured faster for this engine (see FetchOptions)
    options.threaded_sync = True  # measured faster for this engine: one syncfs per batch, overlapped
    # What exists now (modules, classes) lives as long as the process: keep
    # the collector from walking it again and again while messages stream.
    gc.freeze()
    try:
        try:
            result = blocking.run_fetch(url, creds, target, state_dir, options, progress,
                                        **connection_kwargs(args))
        except Exception as e:
            text, code = describe_error(e)
            sys.stderr.write(f"popservice: {text}\n")
            return code
        return report(result)
    finally:
        close_target(target)


def _run_fetch_twisted(args: argparse.Namespace, creds: Credentials, target: Any, state_dir: str,
                       options: FetchOptions, progress: Progress,
                       report: Callable[[Any], int]) -> int:
    from twisted.internet import defer

    from popservice.client.connect import connect
    from popservice.client.fetch import fetch

    url = parse_url(args.url)

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        client = yield connect(reactor, url, creds, **connection_kwargs(args))
        result = yield fetch(client, target, state_dir, options, progress)
        return report(result)

    try:
        return run_reactor(main)
    finally:
        close_target(target)
