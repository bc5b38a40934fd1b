"""
The client subcommands of C{popservice}: C{fetch}, C{probe}, C{migrate}.

    popservice fetch pop3s://alice@mail.example.org --to maildir:~/Mail
    popservice fetch --config ~/.config/popservice/accounts.toml [--account NAME] [--daemon 5m]
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
the reactor runner); C{fetch --config} runs in L{popservice.client.cli_accounts}
(imported only then).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from popservice.client.cli_common import (
    EX_FAIL,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    parse_duration,
    parse_size,
    run_reactor,
)
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
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


class _Given(argparse.Action):
    """
    Store the value (with C{nargs=0}: C{const}) and note in C{given} that the
    option was on the command line: with C{fetch --config}, options given
    override every selected account's settings, and the others do not.
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        _note(namespace, self.dest)


class _GivenAppend(argparse.Action):
    """L{_Given} for a repeatable option (a list)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or ()), values])
        _note(namespace, self.dest)


def _note(namespace: argparse.Namespace, dest: str) -> None:
    given: set[str] | None = getattr(namespace, "given", None)
    if given is None:
        given = set()
        namespace.given = given
    given.add(dest)


def _connection_options(p: argparse.ArgumentParser, url_optional: bool = False) -> None:
    url_help = "pop3://[user[;AUTH=mech]@]host[:port] or pop3s://... (RFC 2384)"
    if url_optional:
        p.add_argument("url", nargs="?", help=url_help + "; not with --config")
    else:
        p.add_argument("url", help=url_help)
    p.add_argument("--ca-file", metavar="PEM", action=_Given,
                   help="trust only the CA certificate(s) in this PEM file")
    p.add_argument("--insecure", action=_Given, nargs=0, const=True, default=False,
                   help="do not verify the server certificate (dangerous)")
    p.add_argument("--starttls", choices=("required", "optional", "none"), default="required", action=_Given,
                   help="for pop3:// URLs: STLS is required (default), used when offered "
                        "(optional, open to downgrade), or never used (none; a password is then "
                        "sent in clear only with --allow-plaintext)")
    p.add_argument("--timeout", type=float, default=60.0, action=_Given, help="network timeout in seconds")


def _login_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", action=_Given, help="login name (default: from the URL, else the local user)")
    p.add_argument("--auth", metavar="MECH", action=_GivenAppend,
                   help="allowed login method(s): SCRAM-SHA-256, CRAM-MD5, PLAIN, LOGIN, "
                        "XOAUTH2, OAUTHBEARER, APOP, USER (default: the strongest offered)")
    p.add_argument("--password-env", metavar="VAR", default="POPSERVICE_PASSWORD", action=_Given,
                   help="take the password from this environment variable (default %(default)s)")
    p.add_argument("--password-command", metavar="CMD", action=_Given,
                   help="run CMD (through the shell); its first output line is the password")
    p.add_argument("--netrc", nargs="?", const="", metavar="FILE", action=_Given,
                   help="look the password up in ~/.netrc (or FILE)")
    p.add_argument("--oauth-token-command", metavar="CMD", action=_Given,
                   help="run CMD for an OAuth 2.0 access token (XOAUTH2/OAUTHBEARER)")
    p.add_argument("--allow-plaintext", action=_Given, nargs=0, const=True, default=False,
                   help="allow sending the password in clear without TLS (with --starttls none)")


def _add_fetch(sub: Any) -> None:
    p = sub.add_parser("fetch", help="download new mail (crash-safe, exactly once)",
                       description="Download mail from a POP3 server into a Maildir, mbox or MDA, "
                                   "or forward it by LMTP or SMTP; one account (URL) or the accounts "
                                   "of a config file (--config), once or polling (--daemon).")
    _connection_options(p, url_optional=True)
    _login_options(p)
    p.add_argument("--to", metavar="TARGET", action=_Given,
                   help="maildir:PATH, mbox:PATH, mda:COMMAND (%%u = user name), lmtp:HOST:PORT, "
                        "lmtp:/path/socket or smtp:HOST[:PORT] (required without --config)")
    p.add_argument("--recipient", metavar="ADDR", action=_GivenAppend,
                   help="lmtp:/smtp: the envelope recipient (repeatable; LMTP default: the local "
                        "user name; SMTP needs one)")
    p.add_argument("--on-reject", choices=("keep", "delete"), default="keep", action=_Given,
                   help="lmtp:/smtp: a message refused with 5xx is kept on the server and tried again "
                        "by every run (keep, the default) or recorded as handled and deleted (delete)")
    p.add_argument("--keep", action=_Given, nargs=0, const=True, default=False,
                   help="leave messages on the server (later runs fetch only new ones)")
    p.add_argument("--limit", type=int, metavar="N", action=_Given, help="fetch at most N messages")
    p.add_argument("--max-size", type=_size, metavar="SIZE", action=_Given,
                   help="skip messages larger than SIZE")
    p.add_argument("--crlf", action=_Given, nargs=0, const=True, default=False,
                   help="store CRLF line ends (default: LF)")
    p.add_argument("--state-dir", metavar="DIR", action=_Given, help="journal directory for this account "
                   "(default: $XDG_STATE_HOME/popservice/fetch/USER@HOST:PORT)")
    p.add_argument("--window", type=int, default=32, action=_Given, help="pipelined RETRs in flight")
    p.add_argument("--batch", type=int, default=256, metavar="N", action=_Given,
                   help="messages made durable together (one sync and journal write per batch)")
    p.add_argument("--sync", choices=("batch", "file"), default="batch", action=_Given,
                   help="maildir: make a batch durable with one syncfs(2) (batch, the default on "
                   "Linux; it also waits for other programs' writes to that filesystem) or with "
                   "an fdatasync per file (file)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.add_argument("--progress", action="store_true", help="show progress even when not on a TTY")
    p.add_argument("--engine", choices=("blocking", "twisted"), default="blocking",
                   help="the stdlib blocking engine (default: starts fast) or the Twisted one")
    p.add_argument("--config", metavar="FILE",
                   help="fetch the accounts of this TOML file (options given here override theirs)")
    p.add_argument("--account", metavar="NAME", action="append",
                   help="with --config: only this account (repeatable; default: all)")
    p.add_argument("--daemon", metavar="INTERVAL", type=_duration,
                   help="with --config: keep polling every account, every INTERVAL (300, 90s, 5m, "
                        "1h; an account's interval overrides it), on the Twisted engine")
    p.add_argument("--max-parallel", type=int, default=4, metavar="N",
                   help="with --config: at most N accounts fetched at once (Twisted engine; "
                        "default %(default)s)")
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
