"""
`popservice fetch --config FILE`: many accounts in one TOML file.  The file's
checks in isolation, then a run of four accounts against real servers, as a
process on both engines: two on the private Dovecot (one deleting, one
--keep with its password from a netrc file), one on popservice's own POP3
server (in-process, over a MemoryStore) and one on that server with a wrong
password (there rather than on Dovecot, whose anvil would delay every later
login from 127.0.0.1 after a failure).  Each message lands once in its
target, the failing account is reported and the others are done; the exit
status is the worst account's.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from typing import Any

from twisted.internet import defer, utils
from twisted.trial import unittest

from popservice.client.accounts import ConfigError, load_accounts, select_accounts
from popservice.client.cli_common import EX_FAIL, EX_OK, EX_TEMPFAIL, EX_USAGE, parse_duration, worst
from popservice.delivery.key import message_id
from popservice.stores.memory import MemoryStore
from tests import dovecot_fixture as fx
from tests.support import ServerMixin, make_factory, memory_checker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: str, accounts: dict[str, dict[str, Any]],
                 defaults: dict[str, Any] | None = None) -> str:
    """Write a config file: C{[defaults]} and one C{[accounts.NAME]} table each (atomically)."""
    lines = []
    if defaults:
        lines.append("[defaults]")
        lines += [f"{k} = {toml_value(v)}" for k, v in defaults.items()]
    for name, settings in accounts.items():
        key = name if name.replace("-", "").replace("_", "").isalnum() else toml_value(name)
        lines.append(f"\n[accounts.{key}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def maildir_ids(path: str) -> list[str]:
    """The Message-IDs in a Maildir (new/ and cur/), sorted, duplicates kept."""
    out = []
    for sub in ("new", "cur"):
        d = os.path.join(path, sub)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            with open(os.path.join(d, name), "rb") as f:
                out.append(message_id(f.read()) or "?")
    return sorted(out)


def ids(messages: list[bytes]) -> list[str]:
    return sorted(message_id(m) or "?" for m in messages)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "POPSERVICE_PASSWORD"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> "defer.Deferred[tuple[bytes, bytes, int]]":
    """`popservice fetch ARGS` as a process; the reactor runs on (in-process servers keep serving)."""
    return utils.getProcessOutputAndValue(sys.executable, ["-m", "popservice.client.cli", "fetch", *args],
                                          env=env or cli_env(), path=ROOT)


class ConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "accounts.toml")

    def load(self, accounts: dict[str, dict[str, Any]], defaults: dict[str, Any] | None = None,
             overrides: dict[str, Any] | None = None) -> Any:
        return load_accounts(write_config(self.path, accounts, defaults), overrides)

    def test_defaults_overrides_and_paths(self) -> None:
        accounts = self.load(
            {"work": {"url": "pop3s://alice@mail.example.org", "password_command": "pass mail", "keep": True,
                      "max_size": "20M", "interval": "5m", "ca_file": "ca.pem", "auth": "PLAIN"},
             "home": {"url": "pop3://bob@pop.example.net:1110", "netrc": True, "to": "lmtp:/run/lmtp",
                      "recipient": ["bob", "bob2"], "state_dir": "~/state/home", "limit": 10}},
            defaults={"to": "maildir:Mail", "timeout": 20, "window": 8},
            overrides={"limit": 3})
        self.assertEqual(list(accounts), ["work", "home"])
        work, home = accounts["work"], accounts["home"]
        self.assertEqual(work["to"], f"maildir:{self.dir}/Mail")  # relative to the file
        self.assertEqual(work["ca_file"], f"{self.dir}/ca.pem")
        self.assertEqual((work["max_size"], work.interval, work["keep"], work["auth"]),
                         (20 * 1024 * 1024, 300.0, True, ("PLAIN",)))
        self.assertEqual((work["timeout"], work["window"], work["limit"]), (20, 8, 3))  # defaults, override
        self.assertEqual(home["to"], "lmtp:/run/lmtp")
        self.assertEqual(home["recipient"], ("bob", "bob2"))
        self.assertEqual(home["state_dir"], os.path.expanduser("~/state/home"))
        self.assertEqual((home["netrc"], home.interval, home["limit"]), ("", None, 3))
        self.assertEqual(work.state_directory(), os.path.join(
            os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
            "popservice", "fetch", "alice@mail.example.org:995"))
        options = work.fetch_options()
        self.assertEqual((options.keep, options.limit, options.max_size, options.window),
                         (True, 3, 20 << 20, 8))
        self.assertEqual(list(select_accounts(accounts, ["home"])), ["home"])
        self.assertEqual(list(select_accounts(accounts, [])), ["work", "home"])
        self.assertRaises(ConfigError, select_accounts, accounts, ["nope"])

    def test_errors(self) -> None:
        good = {"url": "pop3://u@h", "password_env": "X", "to": "maildir:/tmp/m"}
        cases = [
            ({"a": {**good, "colour": "red"}}, "unknown key 'colour'"),
            ({"a": {**good, "keep": "yes"}}, "keep must be true or false"),
            ({"a": {**good, "limit": 0}}, "limit must be a whole number"),
            ({"a": {**good, "max_size": "lots"}}, "not a size"),
            ({"a": {**good, "interval": -1}}, "interval must be a duration"),
            ({"a": {**good, "starttls": "maybe"}}, "starttls must be one of"),
            ({"a": {k: v for k, v in good.items() if k != "url"}}, "no url"),
            ({"a": {k: v for k, v in good.items() if k != "to"}}, "no to"),
            ({"a": {k: v for k, v in good.items() if k != "password_env"}}, "no password source"),
            ({"a": {**good, "url": "http://h"}}, "not a pop3:// or pop3s:// URL"),
            ({"a": {**good, "to": "imap:x"}}, "to must be maildir:PATH"),
            ({"a": {**good, "to": "smtp:localhost"}}, "needs a recipient"),
            ({"a": {**good, "to": "lmtp:localhost"}}, "lmtp: needs a port"),
            ({"a": {**good, "recipient": "x@y"}}, "recipient only applies"),
            ({"a b": good}, "an account name is"),
            ({"a": good, "b": good}, "the same journal directory as [accounts.a]"),
        ]
        for accounts, text in cases:
            with self.assertRaises(ConfigError) as caught:
                self.load(accounts)
            self.assertIn(text, str(caught.exception))
        with open(self.path, "w") as f:
            f.write("[accounts.a\n")
        self.assertRaises(ConfigError, load_accounts, self.path)
        with open(self.path, "w") as f:
            f.write("url = 'pop3://x'\n")
        self.assertRaises(ConfigError, load_accounts, self.path)
        self.assertRaises(ConfigError, load_accounts, os.path.join(self.dir, "missing.toml"))

    def test_worst_status_and_durations(self) -> None:
        self.assertEqual(worst([]), EX_OK)
        self.assertEqual(worst([EX_OK, EX_TEMPFAIL]), EX_TEMPFAIL)
        self.assertEqual(worst([EX_TEMPFAIL, EX_FAIL, EX_OK]), EX_FAIL)
        self.assertEqual(worst([EX_FAIL, EX_USAGE, EX_TEMPFAIL]), EX_USAGE)
        self.assertEqual([parse_duration(t) for t in ("300", "0.2", "250ms", "90s", "5m", "2h", "1d")],
                         [300, 0.2, 0.25, 90, 300, 7200, 86400])
        for bad in ("0", "-1", "5 minutes", ""):
            self.assertRaises(ValueError, parse_duration, bad)

    @defer.inlineCallbacks
    def test_command_line_checks(self) -> Any:
        write_config(self.path, {"a": {"url": "pop3://u@127.0.0.1:1", "password_env": "X",
                                       "to": f"maildir:{self.dir}/m"}})
        for args, text in [
            (["--config", self.path, "pop3://u@h"], b"a URL belong in the file"),
            (["--config", self.path, "--user", "x", "--netrc"], b"--user, --netrc belong in the file"),
            (["--config", self.path, "--account", "zz"], b"no such account: zz"),
            (["--config", self.path, "--max-parallel", "0"], b"--max-parallel must be at least 1"),
            (["pop3://u@h", "--to", "maildir:x", "--account", "a"], b"need --config"),
            (["pop3://u@h"], b"needs a URL and --to"),
        ]:
            out, err, rc = yield run_cli(*args)
            self.assertEqual(rc, EX_USAGE, (args, err))
            self.assertIn(text, err)


class FourAccounts(ServerMixin, unittest.TestCase):
    """Two accounts on Dovecot, two on popservice's own server (one with a wrong password)."""

    skip = fx.skip_reason()

    def setUp(self) -> None:
        self.dovecot = fx.get_dovecot()
        self.tmp = tempfile.mkdtemp(prefix="popservice-accounts-")
        self.addCleanup(__import__("shutil").rmtree, self.tmp, True)
        self.msgs = {"deleting": fx.bulk_messages("deleting", 30, 2000),
                     "keeper": fx.bulk_messages("keeper", 12, 1500),
                     "carol": [fx.message("carol", i, b"own server %d\n" % i) for i in range(1, 9)]}
        for user in ("deleting", "keeper"):
            self.dovecot.set_mailbox(user, fx.USERS[user], self.msgs[user])
        self.own = MemoryStore({"carol": list(self.msgs["carol"]), "dave": [fx.message("dave", 1, b"x\n")]})
        checker = memory_checker(carol="carol pw", dave="dave pw")
        self.own_port = self.listen(make_factory(self.own, [checker]))
        netrc = os.path.join(self.tmp, "netrc")
        with open(netrc, "w") as f:
            f.write(f"machine 127.0.0.1 login keeper password {fx.USERS['keeper']}\n")
        os.chmod(netrc, 0o600)
        self.accounts = {
            "dove-del": {"url": f"pop3://deleting@127.0.0.1:{self.dovecot.port}",
                         "password_env": "PW_DELETING", "to": "maildir:mail/deleting",
                         "state_dir": "state/deleting", "batch": 8},
            "dove-keep": {"url": f"pop3s://keeper@127.0.0.1:{self.dovecot.tls_port}", "netrc": netrc,
                          "to": "maildir:mail/keeper", "state_dir": "state/keeper", "keep": True,
                          "ca_file": self.dovecot.cert, "starttls": "required"},
            "own": {"url": f"pop3://carol@127.0.0.1:{self.own_port}", "password_command": "printf 'carol pw'",
                    "to": "maildir:mail/carol", "state_dir": "state/carol"},
            "wrong": {"url": f"pop3://dave@127.0.0.1:{self.own_port}", "password_command": "echo nope",
                      "to": "maildir:mail/dave", "state_dir": "state/dave"},
            "down": {"url": f"pop3://erin@127.0.0.1:{closed_port()}", "password_env": "PW_DELETING",
                     "to": "maildir:mail/erin", "state_dir": "state/erin", "timeout": 5},
        }
        self.config = write_config(os.path.join(self.tmp, "accounts.toml"), self.accounts,
                                   defaults={"starttls": "none", "allow_plaintext": True})
        self.env = cli_env(PW_DELETING=fx.USERS["deleting"])

    def mail(self, user: str) -> list[str]:
        return maildir_ids(os.path.join(self.tmp, "mail", user))

    def dovecot_count(self, user: str) -> int:
        md = self.dovecot.maildir(user)
        return sum(len(os.listdir(os.path.join(md, sub))) for sub in ("cur", "new"))

    def lines(self, err: bytes) -> dict[str, str]:
        """The summary lines by account."""
        out = {}
        for line in err.decode().splitlines():
            name, sep, rest = line.partition(": ")
            if sep and name in self.accounts:
                out[name] = rest
        return out

    @defer.inlineCallbacks
    def check_engine(self, engine: str) -> Any:
        base = ["--config", self.config, "--engine", engine, "--account", "dove-del",
                "--account", "dove-keep", "--account", "own", "--account", "wrong"]
        out, err, rc = yield run_cli(*base, env=self.env)
        self.assertEqual(rc, EX_FAIL, err)  # the wrong password is the worst
        lines = self.lines(err)
        self.assertEqual(set(lines), {"dove-del", "dove-keep", "own", "wrong"}, err)
        self.assertIn("30 messages fetched", lines["dove-del"])
        self.assertIn("12 messages fetched", lines["dove-keep"])
        self.assertIn("8 messages fetched", lines["own"])
        self.assertIn("authentication failed", lines["wrong"])
        self.assertTrue(lines["wrong"].endswith("[status 1]"), lines["wrong"])
        for name in ("dove-del", "dove-keep", "own"):
            self.assertNotIn("[status", lines[name])
        self.assertEqual(self.mail("deleting"), ids(self.msgs["deleting"]))
        self.assertEqual(self.mail("keeper"), ids(self.msgs["keeper"]))
        self.assertEqual(self.mail("carol"), ids(self.msgs["carol"]))
        self.assertEqual(self.mail("dave"), [])
        self.assertEqual((self.dovecot_count("deleting"), self.dovecot_count("keeper")), (0, 12))
        self.assertEqual(self.own.messages["carol"], [])
        self.assertEqual(len(self.own.messages["dave"]), 1)
        # new mail on the own server; the second run brings only that, once
        extra = fx.message("carol", 50, b"later\n")
        self.own.messages["carol"].append(extra)
        out, err, rc = yield run_cli(*base[:-2], env=self.env)  # without "wrong": all succeed
        self.assertEqual(rc, EX_OK, err)
        lines = self.lines(err)
        self.assertIn("0 messages fetched", lines["dove-del"])
        self.assertIn("12 already fetched", lines["dove-keep"])
        self.assertIn("1 message fetched", lines["own"])
        self.assertEqual(self.mail("carol"), ids(self.msgs["carol"] + [extra]))
        self.assertEqual(self.mail("keeper"), ids(self.msgs["keeper"]))
        # an unreachable server is temporary (75); with the wrong password beside it, 1 wins
        out, err, rc = yield run_cli("--config", self.config, "--engine", engine, "--account", "down",
                                     env=self.env)
        self.assertEqual(rc, EX_TEMPFAIL, err)
        self.assertIn("network: connection refused [status 75]", self.lines(err)["down"])
        out, err, rc = yield run_cli("--config", self.config, "--engine", engine, "--account", "down",
                                     "--account", "wrong", "-q", env=self.env)
        self.assertEqual(rc, EX_FAIL, err)
        self.assertEqual(set(self.lines(err)), {"down", "wrong"})

    def test_blocking_engine(self) -> Any:
        return self.check_engine("blocking")

    def test_twisted_engine(self) -> Any:
        return self.check_engine("twisted")

    @defer.inlineCallbacks
    def test_command_line_overrides(self) -> Any:
        """Options given with --config apply to every selected account: here --keep and --limit."""
        out, err, rc = yield run_cli("--config", self.config, "--account", "own", "--account", "dove-del",
                                     "--keep", "--limit", "5", env=self.env)
        self.assertEqual(rc, EX_OK, err)
        lines = self.lines(err)
        self.assertIn("5 messages fetched", lines["own"])
        self.assertIn("0 deleted on server", lines["own"])
        self.assertEqual(len(self.own.messages["carol"]), 8)
        self.assertEqual(self.dovecot_count("deleting"), 30)
        self.assertEqual(len(self.mail("deleting")), 5)
