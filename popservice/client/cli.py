"""
The client subcommands of C{popservice}: C{fetch}, C{probe}, C{migrate}.

    popservice fetch pop3s://alice@mail.example.org --to maildir:~/Mail
    popservice probe pop3://mail.example.org
    popservice migrate pop3s://alice@old.example.org --to maildir:/srv/mail/alice

C{add_subcommands(subparsers)} registers them on an argparse subparsers
object; each sets C{handler} (a function taking the parsed namespace and
returning an exit status).  C{python -m popservice.client.cli} runs them alone.

This module holds the argument parsing and L{main}; each subcommand runs in
its own module: L{popservice.client.cli_fetch}, L{popservice.client.cli_probe},
L{popservice.client.cli_migrate} (the last two are imported only when their
parser is built), with L{popservice.client.cli_credentials} (password
sources) and L{popservice.client.cli_common} (exit statuses, error messages,
the reactor runner).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

from popservice.client.cli_common import EX_FAIL, EX_OK, EX_TEMPFAIL, EX_USAGE, run_reactor
from popservice.client.cli_credentials import resolve_credentials
from popservice.client.cli_fetch import default_state_dir, run_fetch
from popservice.client.delivery import DeliveryError, StateLocked

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "add_subcommands", "main", "EX_OK", "EX_TEMPFAIL",
    # moved to the cli_* modules; still importable from here
    "EX_FAIL", "EX_USAGE", "default_state_dir", "resolve_credentials", "run_fetch", "run_reactor",
]


# --------------------------------------------------------------------------
# Arguments

def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]


def _connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="pop3://[user[;AUTH=mech]@]host[:port] or pop3s://... (RFC 2384)")
    p.add_argument("--ca-file", metavar="PEM", help="trust only the CA certificate(s) in this PEM file")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server certificate (dangerous)")
    p.add_argument("--starttls", choices=("required", "optional", "none"), default="required",
                   help="for pop3:// URLs: STLS is required (default), used when offered "
                        "(optional, open to downgrade), or never used (none; a password is then "
                        "sent in clear only with --allow-plaintext)")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")


def _login_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", help="login name (default: from the URL, else the local user)")
    p.add_argument("--auth", metavar="MECH", action="append",
                   help="allowed login method(s): SCRAM-SHA-256, CRAM-MD5, PLAIN, LOGIN, "
                        "XOAUTH2, OAUTHBEARER, APOP, USER (default: the strongest offered)")
    p.add_argument("--password-env", metavar="VAR", default="POPSERVICE_PASSWORD",
                   help="take the password from this environment variable (default %(default)s)")
    p.add_argument("--password-command", metavar="CMD",
                   help="run CMD (through the shell); its first output line is the password")
    p.add_argument("--netrc", nargs="?", const="", metavar="FILE",
                   help="look the password up in ~/.netrc (or FILE)")
    p.add_argument("--oauth-token-command", metavar="CMD",
                   help="run CMD for an OAuth 2.0 access token (XOAUTH2/OAUTHBEARER)")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="allow sending the password in clear without TLS (with --starttls none)")


def _add_fetch(sub: Any) -> None:
    p = sub.add_parser("fetch", help="download new mail (crash-safe, exactly once)",
                       description="Download mail from a POP3 server into a Maildir, mbox or MDA.")
    _connection_options(p)
    _login_options(p)
    p.add_argument("--to", required=True, metavar="TARGET",
                   help="maildir:PATH, mbox:PATH or mda:COMMAND (%%u = user name)")
    p.add_argument("--keep", action="store_true",
                   help="leave messages on the server (later runs fetch only new ones)")
    p.add_argument("--limit", type=int, metavar="N", help="fetch at most N messages")
    p.add_argument("--max-size", type=_size, metavar="SIZE", help="skip messages larger than SIZE")
    p.add_argument("--crlf", action="store_true", help="store CRLF line ends (default: LF)")
    p.add_argument("--state-dir", metavar="DIR", help="journal directory for this account "
                   "(default: $XDG_STATE_HOME/popservice/fetch/USER@HOST:PORT)")
    p.add_argument("--window", type=int, default=32, help="pipelined RETRs in flight")
    p.add_argument("--batch", type=int, default=256, metavar="N",
                   help="messages made durable together (one sync and journal write per batch)")
    p.add_argument("--sync", choices=("batch", "file"), default="batch",
                   help="maildir: make a batch durable with one syncfs(2) (batch, the default on "
                   "Linux; it also waits for other programs' writes to that filesystem) or with "
                   "an fdatasync per file (file)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.add_argument("--progress", action="store_true", help="show progress even when not on a TTY")
    p.add_argument("--engine", choices=("blocking", "twisted"), default="blocking",
                   help="the stdlib blocking engine (default: starts fast) or the Twisted one")
    p.set_defaults(handler=run_fetch)


def _add_probe(sub: Any) -> None:
    from popservice.client.cli_probe import run_probe  # (Twisted-based: a fetch does not load it)

    p = sub.add_parser("probe", help="show what a POP3 server offers",
                       description="Greeting, CAPA before and after STLS, certificate, mechanisms.")
    _connection_options(p)
    p.set_defaults(handler=run_probe, starttls="optional")


def _add_migrate(sub: Any) -> None:
    from popservice.client.cli_migrate import run_migrate  # (Twisted-based: a fetch does not load it)

    p = sub.add_parser("migrate", help="copy a mailbox into a popservice Maildir, keeping its UIDLs",
                       description="Copy every message of a POP3 mailbox into a Maildir served by "
                                   "popservice; the old server's UIDLs are kept so clients do not "
                                   "download everything again.")
    _connection_options(p)
    _login_options(p)
    p.add_argument("--to", required=True, metavar="maildir:PATH")
    p.add_argument("--delete", action="store_true", help="delete from the old server afterwards")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(handler=run_migrate)


_SUBCOMMANDS = {"fetch": _add_fetch, "probe": _add_probe, "migrate": _add_migrate}


def add_subcommands(subparsers: Any, only: str | None = None) -> None:
    """
    Register C{fetch}, C{probe} and C{migrate} on an argparse subparsers
    object; C{only}: just that one (the command being run: argparse spends
    milliseconds on every option, and a fetch should not wait for the others').
    """
    for name, add in _SUBCOMMANDS.items():
        if only is None or name == only:
            add(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="popservice")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    add_subcommands(sub, only=argv[0] if argv and argv[0] in _SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ValueError, DeliveryError, StateLocked) as e:
        sys.stderr.write(f"popservice: {e}\n")
        return EX_TEMPFAIL if isinstance(e, StateLocked) else EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
