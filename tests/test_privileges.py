"""
Least privilege: twistd binds a port below 1024 as root, then runs as
C{--uid/--gid}; Maildirs are opened only below the mail root and only when
owned by the user's uid from the passwd-file; symbolic links inside a
Maildir are never followed.
"""

from __future__ import annotations

import grp
import os
import poplib
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from popservice import tap
from popservice.interfaces import MailboxForbidden
from popservice.stores.maildir import MaildirStore
from popservice.stores.maildir.layout import outside_root
from tests.support import ServerMixin, make_factory, memory_checker

TWISTD = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")
MESSAGE = b"Subject: hello\n\nthe body\n"


def make_maildir(path: str, messages: tuple[bytes, ...] | list[bytes] = ()) -> str:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    for i, m in enumerate(messages):
        with open(os.path.join(path, "new", "%d.M%dP1.test" % (1700000000 + i, i)), "wb") as f:
            f.write(m)
    return path


class OutsideRoot(unittest.TestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.base, "mail")
        make_maildir(os.path.join(self.root, "alice"))
        make_maildir(os.path.join(self.base, "elsewhere"))

    def test_inside(self) -> None:
        self.assertIsNone(outside_root(os.path.join(self.root, "alice"), self.root))
        self.assertIsNone(outside_root(os.path.join(self.root, "not-yet"), self.root))
        os.symlink(os.path.join(self.root, "alice"), os.path.join(self.root, "alias"))
        self.assertIsNone(outside_root(os.path.join(self.root, "alias"), self.root))

    def test_maildir_or_subdirectory_leading_out(self) -> None:
        elsewhere = os.path.join(self.base, "elsewhere")
        os.symlink(elsewhere, os.path.join(self.root, "eve"))
        self.assertEqual(outside_root(os.path.join(self.root, "eve"), self.root),
                         (os.path.join(self.root, "eve"), elsewhere))
        os.rmdir(os.path.join(self.root, "alice", "cur"))
        os.symlink(os.path.join(elsewhere, "cur"), os.path.join(self.root, "alice", "cur"))
        self.assertEqual(outside_root(os.path.join(self.root, "alice"), self.root),
                         (os.path.join(self.root, "alice", "cur"), os.path.join(elsewhere, "cur")))

    def test_a_symlinked_root_is_the_operators_choice(self) -> None:
        os.symlink(self.root, os.path.join(self.base, "link"))
        root = os.path.join(self.base, "link")
        self.assertIsNone(outside_root(os.path.join(root, "alice"), root))

    def test_mail_root(self) -> None:
        self.assertEqual(MaildirStore("/srv/mail/%u").mail_root("a", None), "/srv/mail")
        self.assertEqual(MaildirStore("/srv/mail/%u/Maildir").mail_root("a", None), "/srv/mail")
        self.assertEqual(MaildirStore("/srv/mail/u-%u").mail_root("a", None), "/srv/mail")
        self.assertEqual(MaildirStore("/srv/100%%/%u").mail_root("a", None), "/srv/100%")
        self.assertEqual(MaildirStore("/srv/shared").mail_root("a", None), "/srv/shared")
        self.assertEqual(MaildirStore("~/Maildir").mail_root("a", "/home/a/"), "/home/a")


class StoreChecks(unittest.TestCase):
    """The store refuses what lies outside the mail root or belongs to another uid, with MailboxForbidden."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.base, "mail")
        make_maildir(os.path.join(self.root, "alice"), [MESSAGE])
        self.elsewhere = make_maildir(os.path.join(self.base, "elsewhere"),
                                      [b"Subject: secret\n\nnot yours\n"])
        os.symlink(self.elsewhere, os.path.join(self.root, "eve"))

    @defer.inlineCallbacks
    def opened(self, store: MaildirStore, user: str, home: str | None = None) -> Any:
        mailbox = yield store.open_mailbox(user, home)
        listing = yield mailbox.listing()
        yield mailbox.close()
        return len(listing)

    @defer.inlineCallbacks
    def test_symlink_out_of_the_root(self) -> Any:
        store = MaildirStore(self.root + "/%u")
        error = yield self.assertFailure(store.open_mailbox("eve", None), MailboxForbidden)
        self.assertIn("outside the mail root %s" % (self.root,), str(error))
        self.assertFalse(os.path.exists(os.path.join(self.elsewhere, "popservice.lock")))
        self.assertEqual((yield self.opened(store, "alice")), 1)
        self.assertEqual((yield self.opened(MaildirStore(self.root + "/%u", allow_symlinks=True), "eve")), 1)

    @defer.inlineCallbacks
    def test_home_is_the_root_of_tilde_templates(self) -> Any:
        home = os.path.join(self.base, "home", "eve")
        os.makedirs(home)
        os.symlink(self.elsewhere, os.path.join(home, "Maildir"))
        store = MaildirStore("~/Maildir")
        yield self.assertFailure(store.open_mailbox("eve", home), MailboxForbidden)
        make_maildir(os.path.join(self.base, "home", "carol", "Maildir"), [MESSAGE])
        self.assertEqual((yield self.opened(store, "carol", os.path.join(self.base, "home", "carol"))), 1)

    @defer.inlineCallbacks
    def test_delivery_refused_too(self) -> Any:
        store = MaildirStore(self.root + "/%u")
        yield self.assertFailure(store.deliver("eve", None, MESSAGE, None), MailboxForbidden)
        self.assertEqual(len(os.listdir(os.path.join(self.elsewhere, "new"))), 1)

    @defer.inlineCallbacks
    def test_owner(self) -> Any:
        me = str(os.getuid())
        name = pwd.getpwuid(os.getuid()).pw_name
        for uid in (me, name, "", None):
            store = MaildirStore(self.root + "/%u", owner_of=lambda user, uid=uid: uid)  # type: ignore[misc]
            self.assertEqual((yield self.opened(store, "alice")), 1, uid)
        for uid in (str(os.getuid() + 1), "no-such-user-here"):
            store = MaildirStore(self.root + "/%u", owner_of=lambda user, uid=uid: uid)  # type: ignore[misc]
            error = yield self.assertFailure(store.open_mailbox("alice", None), MailboxForbidden)
            self.assertIn(uid, str(error))
            yield self.assertFailure(store.deliver("alice", None, MESSAGE, None), MailboxForbidden)

    @defer.inlineCallbacks
    def test_new_maildir_is_checked_once_made(self) -> Any:
        store = MaildirStore(self.root + "/%u", owner_of=lambda user: str(os.getuid()))
        self.assertEqual((yield self.opened(store, "newcomer")), 0)
        store = MaildirStore(self.root + "/%u", owner_of=lambda user: str(os.getuid() + 1))
        yield self.assertFailure(store.open_mailbox("other", None), MailboxForbidden)


class LoginAnswers(ServerMixin, unittest.TestCase):
    """A refused Maildir is -ERR [SYS/PERM] for the login, and one log line."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.base, "mail")
        self.alice = make_maildir(os.path.join(self.root, "alice"), [MESSAGE, MESSAGE])
        elsewhere = make_maildir(os.path.join(self.base, "elsewhere"), [MESSAGE])
        os.symlink(elsewhere, os.path.join(self.root, "eve"))
        store = MaildirStore(self.root + "/%u", owner_of=lambda user: {"bob": str(os.getuid() + 1)}.get(user))
        make_maildir(os.path.join(self.root, "bob"), [MESSAGE])
        self.listen(make_factory(store, [memory_checker(alice="secret", eve="evepw", bob="bobpw")]))
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def test_refused(self) -> Any:
        for user, password, why in (("eve", "evepw", "outside the mail root"),
                                    ("bob", "bobpw", "belongs to uid")):
            del self.events[:]
            client = yield self.connect()
            yield client.command(b"USER " + user.encode())
            answer = yield client.command(b"PASS " + password.encode())
            self.assertEqual(answer, b"-ERR [SYS/PERM] Mailbox is not accessible")
            warnings = [e for e in self.events if e.get("log_level", LogLevel.info) >= LogLevel.warn]
            self.assertEqual(len(warnings), 1, warnings)
            self.assertEqual(warnings[0]["user"], user)
            self.assertIn(why, warnings[0]["why"])
            # the connection stays usable: another login works
            yield client.command(b"USER alice")
            self.assertTrue((yield client.command(b"PASS secret")).startswith(b"+OK"))
            yield client.command(b"QUIT")

    @defer.inlineCallbacks
    def test_symlinked_message_file_is_not_followed(self) -> Any:
        secret = os.path.join(self.base, "secret")
        with open(secret, "wb") as f:
            f.write(b"Subject: root's\n\nsecret\n")
        client = yield self.login()
        # another program swaps a listed message file for a link after the listing was made
        [name] = [n for n in os.listdir(os.path.join(self.alice, "cur")) if n.startswith("1700000000.")]
        path = os.path.join(self.alice, "cur", name)
        os.unlink(path)
        os.symlink(secret, path)
        first, body = yield client.command_multi(b"RETR 1")
        self.assertTrue(first.startswith(b"-ERR"), first)
        self.assertNotIn(b"secret", body)
        self.flushLoggedErrors()


class TapWiring(unittest.TestCase):
    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_owner_from_the_passwd_file(self) -> None:
        passwd = os.path.abspath(self.mktemp())
        with open(passwd, "w") as f:
            f.write("alice:{PLAIN}pw:1234:1234::::\nbob:{PLAIN}pw:::::\ncarol:{PLAIN}pw:vmail:::::\n")
        root = os.path.abspath(self.mktemp())
        store: Any = tap.make_factory(self.parse("--mail", "maildir:%s/%%u" % root,
                                                 "--auth", "passwd-file:" + passwd)).portal.realm.store
        self.assertFalse(store.allow_symlinks)
        self.assertEqual([store.owner_of(u) for u in ("alice", "bob", "carol", "nobody-here")],
                         ["1234", None, "vmail", None])
        options = self.parse("--mail", "maildir:%s/%%u" % root, "--auth", "passwd-file:" + passwd,
                             "--ignore-mail-owner", "--allow-mail-symlinks")
        store = tap.make_factory(options).portal.realm.store
        self.assertIsNone(store.owner_of)
        self.assertTrue(store.allow_symlinks)


def _free_low_port() -> int | None:
    for port in range(1023, 899, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


class DropPrivileges(unittest.TestCase):
    """
    C{twistd -n --uid nobody --gid nogroup pop3 --listen tcp:PORT} with a
    port below 1024: bound as root, then served as nobody, from Maildirs
    owned by nobody.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: binds a port below 1024, then switches to --uid/--gid "
                                    "(CI runs as root)")
        try:
            self.user = pwd.getpwnam("nobody")
        except KeyError:
            raise unittest.SkipTest("no user 'nobody' to switch to")
        try:
            self.group = grp.getgrnam("nogroup")
        except KeyError:
            self.group = grp.getgrgid(self.user.pw_gid)
        if self.user.pw_uid == 0:
            raise unittest.SkipTest("'nobody' is root here")
        port = _free_low_port()
        if port is None:
            raise unittest.SkipTest("no free port below 1024 on 127.0.0.1")
        self.port = port
        self.base = tempfile.mkdtemp(prefix="popservice-privileges-")
        self.addCleanup(shutil.rmtree, self.base, True)
        os.chmod(self.base, 0o755)
        uid, gid = self.user.pw_uid, self.group.gr_gid
        mail = os.path.join(self.base, "mail")
        os.makedirs(mail)
        make_maildir(os.path.join(mail, "alice"), [MESSAGE])
        make_maildir(os.path.join(mail, "mallory"), [MESSAGE])  # stays root's
        make_maildir(os.path.join(self.base, "outside"), [MESSAGE])
        os.symlink(os.path.join(self.base, "outside"), os.path.join(mail, "eve"))
        # the mail root and alice's Maildir are nobody's; mallory's and the link's target stay root's
        os.chown(mail, uid, gid)
        for top, _dirs, files in os.walk(os.path.join(mail, "alice")):
            os.chown(top, uid, gid)
            for name in files:
                os.chown(os.path.join(top, name), uid, gid)
        self.passwd = os.path.join(self.base, "passwd")
        with open(self.passwd, "w") as f:
            for user in ("alice", "mallory", "eve"):
                f.write("%s:{PLAIN}%spw:%d:%d::::\n" % (user, user, uid, gid))
        os.chmod(self.passwd, 0o644)
        self.mail = mail

    def test_serves_as_nobody_after_binding_as_root(self) -> None:
        command = [TWISTD, "-n", "--pidfile=", "--uid", self.user.pw_name, "--gid", self.group.gr_name,
                   "pop3", "--mail", "maildir:%s/%%u" % self.mail, "--auth", "passwd-file:" + self.passwd,
                   "--listen", "tcp:%d:interface=127.0.0.1" % self.port, "--failure-delay", "0"]
        process = subprocess.Popen(command, cwd=self.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            self._wait_listening(process)
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            client.user("alice")
            client.pass_("alicepw")
            self.assertEqual(client.stat()[0], 1)
            self.assertIn(b"the body", b"\n".join(client.retr(1)[1]))
            client.dele(1)
            client.quit()
            for user in ("mallory", "eve"):
                client = poplib.POP3("127.0.0.1", self.port, timeout=10)
                client.user(user)
                with self.assertRaises(poplib.error_proto) as refused:
                    client.pass_(user + "pw")
                self.assertIn(b"[SYS/PERM]", refused.exception.args[0])
                client.quit()
            ids = self._ids(process.pid)
            self.assertEqual(ids["Uid"], [self.user.pw_uid] * 4)
            self.assertEqual(ids["Gid"], [self.group.gr_gid] * 4)
        finally:
            process.send_signal(signal.SIGTERM)
            output = process.communicate(timeout=30)[0].decode("utf-8", "replace")
        self.assertNotIn("Traceback", output)
        self.assertIn("set uid/gid %d/%d" % (self.user.pw_uid, self.group.gr_gid), output)
        # the store worked as nobody: new/ moved to cur/, the message deleted at QUIT, the index written
        alice = os.path.join(self.mail, "alice")
        self.assertEqual(os.listdir(os.path.join(alice, "cur")) + os.listdir(os.path.join(alice, "new")), [])
        self.assertEqual(os.stat(os.path.join(alice, "popservice-uidlist")).st_uid, self.user.pw_uid)
        refusals = [line for line in output.splitlines() if "refused:" in line]
        self.assertEqual(len(refusals), 2, output)
        self.assertIn("mailbox of mallory refused: Maildir %s/mallory belongs to uid 0" % (self.mail,),
                      output)
        self.assertIn("mailbox of eve refused: %s/eve leads to " % (self.mail,), output)

    def _wait_listening(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.fail("twistd exited: %s" % (process.communicate()[0].decode("utf-8", "replace"),))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.fail("twistd did not listen on port %d" % (self.port,))

    @staticmethod
    def _ids(pid: int) -> dict[str, list[int]]:
        """Real, effective, saved and filesystem uid and gid of C{pid}, from /proc."""
        out = {}
        with open("/proc/%d/status" % (pid,)) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Uid", "Gid"):
                    out[key] = [int(v) for v in value.split()]
        return out
