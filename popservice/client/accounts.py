"""
The accounts of C{popservice fetch --config FILE}: a TOML file (read with
tomllib), one table per account, and what one fetch of an account needs
(L{prepare_fetch}: its credentials, journal directory, target and options)
and tells (L{Outcome}).  Both engines and the daemon use it; nothing here
imports Twisted.

    # ~/.config/popservice/accounts.toml
    [defaults]                      # every account's, unless it sets its own
    to = "maildir:~/Mail"
    interval = "5m"                 # --daemon: between polls (overrides --daemon's)

    [accounts.work]
    url = "pop3s://alice@mail.example.org"
    password_command = "pass show mail/work"
    keep = true
    max_size = "20M"
    ca_file = "/etc/ssl/certs/example-ca.pem"

    [accounts.home]
    url = "pop3://bob@pop.example.net"
    netrc = true                    # or the path of a netrc file
    to = "lmtp:/var/run/dovecot/lmtp"
    recipient = "bob"
    interval = 60

The keys (and the C{fetch} options they stand for): C{url} (required),
C{user}, C{auth} (a mechanism or a list), the password source -- one of
C{password_command}, C{password_env} (a variable's name), C{netrc} (true or
a path), C{oauth_token_command} --, C{allow_plaintext}, C{starttls},
C{ca_file}, C{insecure}, C{timeout} (seconds), C{to} (required, here or in
C{[defaults]}), C{recipient} (an address or a list), C{on_reject}, C{keep},
C{limit}, C{max_size} (octets, or C{"20M"}), C{crlf}, C{window}, C{batch},
C{sync}, C{state_dir}, and for the daemon C{interval} and C{max_backoff}
(seconds, or C{"90s"}, C{"5m"}, C{"1h"}).  Unknown keys are errors.  A
relative path (C{ca_file}, C{state_dir}, C{netrc}, a C{maildir:} or C{mbox:}
target) is taken from the config file's directory; C{~} is expanded.

Each account has its own journal: C{state_dir}, by default the one
C{popservice fetch URL} would use for the same mailbox
(C{$XDG_STATE_HOME/popservice/fetch/USER@HOST:PORT}); two accounts may not
share one.  A password is never prompted for: an account without a source
fails (status 2).
"""

from __future__ import annotations

import argparse
import os
import re
import zlib
from collections.abc import Callable, Iterable, Mapping

from popservice.client.cli_common import (
    EX_FAIL,
    EX_USAGE,
    describe_error,
    parse_duration,
    parse_size,
    result_status,
)
from popservice.client.cli_credentials import resolve_credentials
from popservice.client.delivery import FetchOptions, FetchResult, Target, make_target
from popservice.client.journal import default_state_dir
from popservice.client.url import POP3URL, parse_url

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from typing import Any

    from popservice.client.common import Credentials

__all__ = [
    "Account", "AccountError", "ConfigError", "Outcome", "PreparedFetch", "load_accounts", "prepare_fetch",
    "select_accounts",
]


class ConfigError(ValueError):
    """The config file cannot be used (nothing is fetched)."""


class AccountError(Exception):
    """One account cannot be fetched now (its credentials, its target): C{status} is its exit status."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status


#: account names: they appear in logs and summaries
_NAME = re.compile(r"[A-Za-z0-9_.@+-]{1,64}\Z")
#: what a key's value may be: (TOML types, how to check and convert it)
_STR, _BOOL, _INT, _NUMBER = (str,), (bool,), (int,), (int, float)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a whole number of at least 1, not {value!r}")
    return value


def _size(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a size, not {value!r}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    raise ConfigError(f"{key} must be a size (octets, or \"20M\"), not {value!r}")


def _duration(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value > 0:
            return float(value)
    elif isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    raise ConfigError(f"{key} must be a duration (seconds, or \"90s\", \"5m\", \"1h\"), not {value!r}")


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key} must be a number of seconds above 0, not {value!r}")
    return float(value)


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string, not {value!r}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    return value


def _strings(key: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(f"{key} must be a string or a list of strings, not {value!r}")
    return tuple(items)


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, not {value!r}")
        return str(value)
    return check


def _netrc(key: str, value: Any) -> str | None:
    if value is True:
        return ""
    if value is False:
        return None
    return _string(key, value)


#: every key an account (or [defaults]) may set, with its check
KEYS: dict[str, Callable[[str, Any], Any]] = {
    "url": _string, "user": _string, "auth": _strings,
    "password_command": _string, "password_env": _string, "netrc": _netrc, "oauth_token_command": _string,
    "allow_plaintext": _flag, "starttls": _choice("required", "optional", "none"), "ca_file": _string,
    "insecure": _flag, "timeout": _seconds,
    "to": _string, "recipient": _strings, "on_reject": _choice("keep", "delete"),
    "keep": _flag, "limit": _positive_int, "max_size": _size, "crlf": _flag, "window": _positive_int,
    "batch": _positive_int, "sync": _choice("batch", "file"), "state_dir": _string,
    "interval": _duration, "max_backoff": _duration,
}
#: what an account does not set
DEFAULTS: dict[str, Any] = {
    "user": None, "auth": None, "password_command": None, "password_env": None, "netrc": None,
    "oauth_token_command": None, "allow_plaintext": False, "starttls": "required", "ca_file": None,
    "insecure": False, "timeout": 60.0, "recipient": (), "on_reject": "keep", "keep": False, "limit": None,
    "max_size": None, "crlf": False, "window": 32, "batch": 256, "sync": "batch", "state_dir": None,
    "interval": None, "max_backoff": None,
}
#: the keys that hold a path, taken from the config file's directory when relative
_PATHS = ("ca_file", "state_dir")
#: a command-line option that may override every account's setting (fetch --config ... --keep)
OVERRIDABLE = ("to", "recipient", "on_reject", "keep", "limit", "max_size", "crlf", "window", "batch", "sync",
               "ca_file", "insecure", "starttls", "timeout", "allow_plaintext")


class Account:
    """One account of the config file, checked; C{settings} holds every key (see the module docstring)."""

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.settings = dict(settings)
        self.url: POP3URL = parse_url(self.settings["url"])

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Account) and (self.name, self.settings) == (other.name, other.settings)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<Account {self.name} {self.url}>"

    @property
    def interval(self) -> float | None:
        """Its own polling interval (C{None}: the daemon's)."""
        value: float | None = self.settings["interval"]
        return value

    def expected_user(self) -> str:
        """The login name as far as the file tells (the local user when neither key nor URL names one)."""
        name = self.settings["user"] or self.url.user
        if not name:
            import getpass

            name = getpass.getuser()
        return str(name)

    def credentials(self) -> Credentials:
        """The login, running the password or token command (blocking); raises L{AccountError}."""
        s = self.settings
        var = s["password_env"]
        if var and var not in os.environ and not (s["oauth_token_command"] or s["password_command"]
                                                  or s["netrc"] is not None):
            raise AccountError(f"no password: ${var} is not set", EX_USAGE)
        ns = argparse.Namespace(user=s["user"], auth=list(s["auth"]) if s["auth"] else None,
                                password_env=s["password_env"], password_command=s["password_command"],
                                netrc=s["netrc"], oauth_token_command=s["oauth_token_command"],
                                allow_plaintext=s["allow_plaintext"])
        import subprocess

        try:
            return resolve_credentials(ns, self.url, prompt=False)
        except SystemExit as e:
            raise AccountError(str(e.code).removeprefix("popservice: "), EX_USAGE) from None
        except subprocess.CalledProcessError as e:
            raise AccountError(f"the password or token command failed (exit status {e.returncode})",
                               EX_FAIL) from None

    def state_directory(self, username: str | None = None) -> str:
        explicit: str | None = self.settings["state_dir"]
        return explicit or default_state_dir(self.url, username or self.expected_user())

    def fetch_options(self) -> FetchOptions:
        s = self.settings
        return FetchOptions(keep=s["keep"], limit=s["limit"], max_size=s["max_size"], window=s["window"],
                            batch_messages=s["batch"], on_reject=s["on_reject"])

    def connection_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return {"starttls": s["starttls"], "ca_file": s["ca_file"], "insecure": s["insecure"],
                "timeout": s["timeout"]}


def _resolve_paths(settings: dict[str, Any], base: str) -> None:
    def path(p: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    for key in _PATHS:
        if settings.get(key):
            settings[key] = path(settings[key])
    if settings.get("netrc"):
        settings["netrc"] = path(settings["netrc"])
    to = settings.get("to")
    if isinstance(to, str):
        kind, sep, rest = to.partition(":")
        if sep and rest and kind in ("maildir", "mbox"):
            settings["to"] = f"{kind}:{path(rest)}"


def _check_target(spec: str, recipients: tuple[str, ...]) -> None:
    """A target spec's syntax, before anything is created for it (ValueError)."""
    kind, sep, rest = spec.partition(":")
    if kind in ("lmtp", "smtp"):
        from popservice.client.forward import parse_forward_spec

        parse_forward_spec(spec)
        if kind == "smtp" and not recipients:
            raise ValueError("smtp: forwarding needs a recipient address (recipient = \"ADDR\")")
        return
    if kind not in ("maildir", "mbox", "mda") or not sep or not rest:
        raise ValueError(f"to must be maildir:PATH, mbox:PATH, mda:COMMAND, lmtp:HOST:PORT, "
                         f"lmtp:/path/socket or smtp:HOST[:PORT], not {spec!r}")
    if recipients:
        raise ValueError("recipient only applies to lmtp: and smtp: targets")


def _check_table(where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        check = KEYS.get(key)
        if check is None:
            raise ConfigError(f"{where}: unknown key {key!r}")
        try:
            out[key] = check(key, value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return out


def load_accounts(path: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Account]:
    """
    Read and check the config file: its accounts by name, in file order.
    C{overrides} (options from the command line) win over every account's
    settings and C{[defaults]}.  Raises L{ConfigError}.
    """
    import tomllib

    path = os.path.abspath(os.path.expanduser(path))
    base = os.path.dirname(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - {"defaults", "accounts"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                          "(accounts go in [accounts.NAME] tables)")
    defaults = _check_table(f"{path}: [defaults]", data.get("defaults", {}))
    _resolve_paths(defaults, base)
    tables = data.get("accounts", {})
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{path}: no accounts (add [accounts.NAME] tables)")
    accounts: dict[str, Account] = {}
    dirs: dict[str, str] = {}
    for name, table in tables.items():
        where = f"{path}: [accounts.{name}]"
        if not _NAME.match(name):
            raise ConfigError(f"{where}: an account name is 1-64 letters, digits and _.@+-")
        own = _check_table(where, table)
        _resolve_paths(own, base)
        settings = {**DEFAULTS, **defaults, **own, **(overrides or {})}
        for key in ("url", "to"):
            if not settings.get(key):
                raise ConfigError(f"{where}: no {key}")
        settings["recipient"] = tuple(settings["recipient"] or ())
        try:
            _check_target(settings["to"], settings["recipient"])
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not (settings["password_command"] or settings["password_env"] or settings["netrc"] is not None
                or settings["oauth_token_command"]):
            raise ConfigError(f"{where}: no password source (password_command, password_env, netrc or "
                              "oauth_token_command)")
        try:
            account = Account(name, settings)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        state = account.state_directory()
        if state in dirs:
            raise ConfigError(f"{where}: the same journal directory as [accounts.{dirs[state]}] ({state}): "
                              "give one of them its own state_dir")
        dirs[state] = name
        accounts[name] = account
    return accounts


def select_accounts(accounts: Mapping[str, Account], names: Iterable[str] | None) -> dict[str, Account]:
    """Only the named accounts (all when C{names} is empty), in file order; an unknown name is an error."""
    wanted = list(dict.fromkeys(names or ()))
    unknown = [n for n in wanted if n not in accounts]
    if unknown:
        raise ConfigError(f"no such account: {', '.join(unknown)} (the file has {', '.join(accounts)})")
    return {n: a for n, a in accounts.items() if not wanted or n in wanted}


# --------------------------------------------------------------------------
# One fetch of one account

class PreparedFetch:
    """What one fetch of an account needs; L{prepare_fetch} makes it."""

    def __init__(self, account: Account, credentials: Credentials, state_dir: str, target: Target,
                 options: FetchOptions, warnings: list[str]) -> None:
        self.account = account
        self.credentials = credentials
        self.state_dir = state_dir
        self.target = target
        self.options = options
        self.warnings = warnings


def prepare_fetch(account: Account, stop: Callable[[], bool] | None = None) -> PreparedFetch:
    """
    Resolve the credentials (running their commands), make the journal
    directory and the target.  Blocking.  Raises L{AccountError}.
    """
    creds = account.credentials()
    s = account.settings
    try:
        state_dir = account.state_directory(creds.username)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        warnings: list[str] = []
        target = make_target(s["to"], username=creds.username, state_dir=state_dir, crlf=s["crlf"],
                             warn=warnings.append, tag="%08x" % zlib.crc32(state_dir.encode()),
                             sync=s["sync"], recipients=s["recipient"], timeout=s["timeout"])
    except Exception as e:
        text, status = describe_error(e)
        raise AccountError(text, status) from e
    options = account.fetch_options()
    options.stop = stop
    return PreparedFetch(account, creds, state_dir, target, options, warnings)


class Outcome:
    """How one fetch of an account ended: C{status} (an exit status), its result or the error."""

    def __init__(self, name: str, status: int, result: FetchResult | None = None, error: str | None = None,
                 warnings: Iterable[str] = ()) -> None:
        self.name = name
        self.status = status
        self.result = result
        self.error = error
        self.warnings = list(warnings) + (result.warnings if result is not None else [])

    @classmethod
    def of_result(cls, name: str, result: FetchResult, warnings: Iterable[str] = ()) -> Outcome:
        return cls(name, result_status(result), result=result, warnings=warnings)

    @classmethod
    def of_error(cls, name: str, error: BaseException, warnings: Iterable[str] = ()) -> Outcome:
        if isinstance(error, AccountError):
            return cls(name, error.status, error=str(error), warnings=warnings)
        text, status = describe_error(error)
        return cls(name, status, error=text, warnings=warnings)

    def line(self) -> str:
        """The summary line: C{NAME: what happened}, with C{[status N]} when it is not 0."""
        text = self.result.summary() if self.result is not None else (self.error or "failed")
        return f"{self.name}: {text}" + (f" [status {self.status}]" if self.status else "")
