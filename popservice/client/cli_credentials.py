"""
Where a client subcommand's login comes from: the user name (option, URL or
the local user) and the password or OAuth token (a command's output, an
environment variable, ~/.netrc, or a terminal prompt).
"""

from __future__ import annotations

import os
import sys

from popservice.client.common import Credentials

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    import argparse

    from popservice.client.url import POP3URL

__all__ = ["resolve_credentials"]


# getpass, netrc and subprocess are imported where used: most runs need none of them.

def _command_output(cmd: str) -> str:
    import subprocess

    out = subprocess.run(cmd, shell=True, check=True, stdout=subprocess.PIPE).stdout  # noqa: S602
    return out.decode("utf-8").splitlines()[0] if out else ""


def resolve_credentials(args: argparse.Namespace, url: POP3URL, prompt: bool = True) -> Credentials:
    """
    User name and password/token from the options, the environment, netrc or
    a prompt (only with C{prompt} and a terminal: never for a config file's
    accounts).  Raises C{SystemExit} with the reason when there is none.
    """
    username = args.user or url.user
    if not username:
        import getpass

        username = getpass.getuser()
    password: str | None = None
    token: str | None = None
    if args.oauth_token_command:
        token = _command_output(args.oauth_token_command)
    elif args.password_command:
        password = _command_output(args.password_command)
    elif args.password_env and args.password_env in os.environ:
        password = os.environ[args.password_env]
    elif args.netrc is not None:
        import netrc

        try:
            entry = netrc.netrc(args.netrc or None).authenticators(url.host)
        except (OSError, netrc.NetrcParseError) as e:
            raise SystemExit(f"popservice: netrc: {e}")
        if entry is None:
            raise SystemExit(f"popservice: no netrc entry for {url.host}")
        if entry[0] and not (args.user or url.user):
            username = entry[0]
        password = entry[2]
    elif prompt and sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"Password for {username}@{url.host}: ")
    else:
        raise SystemExit("popservice: no password: use --password-env, --password-command, "
                         "--netrc or a terminal")
    mechs = tuple(m.upper() for m in args.auth) if args.auth else url.mechanisms
    # --starttls none only says not to use STLS: sending a password in clear
    # over that connection takes --allow-plaintext too (as --help says)
    return Credentials(username, password, token, mechanisms=mechs, allow_plaintext=args.allow_plaintext)
