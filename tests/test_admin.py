"""Tests for popservice.admin: the `popservice passwd` command."""

from __future__ import annotations

import argparse
import getpass
import io
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any

import scramp
from twisted.internet import defer
from twisted.trial import unittest

from popservice import admin
from popservice.auth.passwdfile import PasswdFileChecker, parse_passwd_file, verify_password
from popservice.sasl.base import Authenticated, SASLContext
from popservice.sasl.scram import ScramSHA1Mechanism, ScramSHA256Mechanism
from popservice.server.login import PlainCredentials


def sync_thread(f: Any) -> "defer.Deferred[Any]":
    return defer.succeed(f())


class PasswdCommand(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.file = os.path.join(self.dir, "passwd")
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def run_cmd(self, argv: Sequence[str], password: str | None = None) -> int:
        parser = argparse.ArgumentParser(prog="popservice")
        admin.add_subcommands(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(list(argv))
        if password is not None:
            self.patch(sys, "stdin", io.StringIO(password + "\n"))
        result = int(args.func(args))
        if password:
            output = (self.stdout.getvalue() + self.stderr.getvalue()).replace(self.dir, "DIR")
            self.assertNotIn(password, output)
        return result

    def add(self, user: str, password: str, *extra: str) -> int:
        argv = ["passwd", "add", user, "--file", self.file, "--password-stdin", *extra]
        return self.run_cmd(argv, password)

    def records(self) -> Any:
        with open(self.file, "rb") as f:
            return parse_passwd_file(f.read())

    def login(self, user: str, password: str) -> Any:
        checker = PasswdFileChecker(self.file, run_in_thread=sync_thread)
        d = checker.requestAvatarId(PlainCredentials(user.encode(), password.encode()))
        return self.successResultOf(d.addErrback(lambda f: None))

    def scram(self, user: str, password: str, mech: type = ScramSHA256Mechanism) -> bool:
        checker = PasswdFileChecker(self.file)
        m = mech(SASLContext(hostname="h", tls=True, checkers=(checker,)))
        client = scramp.ScramClient([mech.name], user, password)
        first = m.step(client.get_client_first().encode())
        client.set_server_first(first.data.decode())
        final = m.step(client.get_client_final().encode())
        if not hasattr(final, "data"):
            return False
        client.set_server_final(final.data.decode())
        return isinstance(m.step(b""), Authenticated)

    # -- add ----------------------------------------------------------------

    def test_add_default_argon2id(self) -> None:
        self.assertEqual(self.add("alice", "s3cret pass"), 0)
        record = self.records()["alice"]
        self.assertEqual(record.scheme, "ARGON2ID")
        self.assertTrue(verify_password("s3cret pass", record.password))
        self.assertEqual(stat.S_IMODE(os.stat(self.file).st_mode), 0o600)
        self.assertEqual(self.login("alice", "s3cret pass"), "alice")
        self.assertIsNone(self.login("alice", "wrong"))

    def test_add_schemes(self) -> None:
        for i, scheme in enumerate(admin.SCHEMES):
            self.assertEqual(self.add("user%d" % i, "pw%d" % i, "--scheme", scheme.lower()), 0)
        records = self.records()
        for i, scheme in enumerate(admin.SCHEMES):
            self.assertEqual(records["user%d" % i].scheme, scheme)
            self.assertTrue(verify_password("pw%d" % i, records["user%d" % i].password), scheme)

    def test_add_existing_user_refused(self) -> None:
        self.add("alice", "one", "--scheme", "PLAIN")
        with open(self.file, "rb") as f:
            before = f.read()
        self.assertEqual(self.add("alice", "two", "--scheme", "PLAIN"), 1)
        self.assertIn("already exists", self.stderr.getvalue())
        with open(self.file, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_add_scram_next_to_a_hash(self) -> None:
        self.assertEqual(self.add("bob", "bobpw", "--scheme", "SSHA512", "--scram"), 0)
        record = self.records()["bob"]
        self.assertEqual(record.scheme, "SSHA512")
        self.assertEqual(set(record.extra), {"scram_sha256", "scram_sha1"})
        self.assertNotIn("bobpw", open(self.file).read())
        self.assertTrue(self.scram("bob", "bobpw"))
        self.assertTrue(self.scram("bob", "bobpw", ScramSHA1Mechanism))
        self.assertFalse(self.scram("bob", "wrong"))
        self.assertEqual(self.login("bob", "bobpw"), "bob")

    def test_empty_password_refused(self) -> None:
        self.assertEqual(self.add("alice", ""), 1)
        self.assertFalse(os.path.exists(self.file))

    def test_bad_user_names(self) -> None:
        for user in ["../etc", "a/b", ".hidden", "a:b", "a b", "a\tb", "", "x" * 300, "#x", "a%u"]:
            self.assertEqual(self.add(user, "pw", "--scheme", "PLAIN"), 1, user)
        self.assertFalse(os.path.exists(self.file))
        self.assertRaises(admin.AdminError, admin.validate_user, "-rf")
        self.assertEqual(admin.validate_user("alice@example.org"), "alice@example.org")

    def test_appends_and_keeps_other_lines(self) -> None:
        with open(self.file, "wb") as f:
            f.write(b"# users\r\nzed:{PLAIN}z:1000:1000::/home/zed::userdb_quota_rule=*:storage=1G")
        os.chmod(self.file, 0o644)
        self.add("alice", "pw", "--scheme", "PLAIN")
        with open(self.file, "rb") as f:
            data = f.read()
        self.assertTrue(data.startswith(b"# users\r\nzed:{PLAIN}z:1000:1000::/home/zed::userdb_quota_rule=*:"
                                        b"storage=1G\nalice:{PLAIN}pw:::::\n"), data)
        self.assertEqual(stat.S_IMODE(os.stat(self.file).st_mode), 0o600)
        self.assertEqual([n for n in os.listdir(self.dir) if n != "passwd.lock"], ["passwd"])

    # -- Maildir --------------------------------------------------------------

    def test_maildir_created(self) -> None:
        template = os.path.join(self.dir, "mail", "%d", "%n")
        self.assertEqual(self.add("alice@example.org", "pw", "--scheme", "PLAIN", "--maildir", template), 0)
        maildir = os.path.join(self.dir, "mail", "example.org", "alice")
        for sub in ("cur", "new", "tmp"):
            path = os.path.join(maildir, sub)
            self.assertTrue(os.path.isdir(path))
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(maildir).st_mode), 0o700)

    def test_maildir_template_checked_before_writing(self) -> None:
        for template in ["/srv/mail/fixed", "/srv/%x/%u", "/srv/%d/%u"]:
            self.assertEqual(self.add("alice", "pw", "--maildir", template), 1, template)
        self.assertFalse(os.path.exists(self.file))
        self.assertEqual(admin.expand_maildir("/m/%u/100%%", "a@b"), "/m/a@b/100%")

    # -- change ----------------------------------------------------------------

    def test_change_keeps_fields(self) -> None:
        with open(self.file, "w") as f:
            f.write("# c\nalice:{PLAIN}old:1000:1000:Alice:/home/alice::nologin\nzed:{PLAIN}z:::::\n"
                    "alice:{PLAIN}dup:::::\n")
        argv = ["passwd", "change", "alice", "--file", self.file, "--password-stdin", "--scheme", "SSHA512"]
        self.assertEqual(self.run_cmd(argv, "new"), 0)
        with open(self.file) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[0], "# c")
        self.assertTrue(lines[1].startswith("alice:{SSHA512}"))
        self.assertTrue(lines[1].endswith(":1000:1000:Alice:/home/alice::nologin"), lines[1])
        self.assertEqual(lines[2:], ["zed:{PLAIN}z:::::"])
        self.assertTrue(verify_password("new", self.records()["alice"].password))

    def test_change_refreshes_or_drops_scram(self) -> None:
        self.add("bob", "old", "--scheme", "SSHA512", "--scram")
        base = ["passwd", "change", "bob", "--file", self.file, "--password-stdin", "--scheme", "SSHA512"]
        self.assertEqual(self.run_cmd(base, "new"), 0)
        self.assertFalse(self.scram("bob", "old"))
        self.assertTrue(self.scram("bob", "new"))
        self.assertEqual(self.run_cmd(base + ["--no-scram"], "newer"), 0)
        self.assertEqual(dict(self.records()["bob"].extra), {})
        self.assertFalse(self.scram("bob", "new"))
        self.assertEqual(self.login("bob", "newer"), "bob")

    def test_change_unknown_user(self) -> None:
        self.add("alice", "pw", "--scheme", "PLAIN")
        argv = ["passwd", "change", "bob", "--file", self.file, "--password-stdin"]
        self.assertEqual(self.run_cmd(argv, "x"), 1)
        self.assertIn("no user", self.stderr.getvalue())

    # -- remove ------------------------------------------------------------------

    def test_remove(self) -> None:
        with open(self.file, "w") as f:
            f.write("alice:{PLAIN}a:::::\n# keep\nbob:{PLAIN}b:::::\nalice:{PLAIN}dup:::::\n")
        self.assertEqual(self.run_cmd(["passwd", "remove", "alice", "--file", self.file]), 0)
        with open(self.file) as f:
            self.assertEqual(f.read(), "# keep\nbob:{PLAIN}b:::::\n")
        self.assertEqual(self.run_cmd(["passwd", "remove", "alice", "--file", self.file]), 1)

    def test_remove_missing_file(self) -> None:
        self.assertEqual(self.run_cmd(["passwd", "remove", "alice", "--file", self.file]), 1)
        self.assertIn("no such file", self.stderr.getvalue())

    # -- the terminal ----------------------------------------------------------

    def test_getpass_twice(self) -> None:
        prompts: list[str] = []
        answers = iter(["tty-secret", "tty-secret"])

        def fake_getpass(prompt: str = "") -> str:
            prompts.append(prompt)
            return next(answers)

        self.patch(getpass, "getpass", fake_getpass)
        argv = ["passwd", "add", "alice", "--file", self.file, "--scheme", "PLAIN"]
        self.assertEqual(self.run_cmd(argv), 0)
        self.assertEqual(len(prompts), 2)
        self.assertEqual(self.login("alice", "tty-secret"), "alice")
        self.assertNotIn("tty-secret", self.stdout.getvalue() + self.stderr.getvalue())

    def test_getpass_mismatch(self) -> None:
        answers = iter(["one", "two"])
        self.patch(getpass, "getpass", lambda prompt="": next(answers))
        self.assertEqual(self.run_cmd(["passwd", "add", "alice", "--file", self.file]), 1)
        self.assertIn("do not match", self.stderr.getvalue())
        self.assertFalse(os.path.exists(self.file))
