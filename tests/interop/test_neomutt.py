"""
NeoMutt (Debian's build: GnuTLS and GNU SASL) against a real C{twistd pop3},
driven through tmux as a user would, every setting at its default apart from
the account:

  - with C{pop_authenticators} unset NeoMutt picks SCRAM-SHA-256 from CAPA and
    GNU SASL sends C{n,a=USER,n=USER,...}; the login must succeed at once, with
    no failed login in the server log (it used to fail and fall back to APOP
    after the failure delay);
  - after C{q} the server must log C{reason=quit} at once: NeoMutt sends QUIT,
    reads C{+OK}, sends its close_notify and closes, and the server used to
    keep the connection in CLOSE-WAIT until its login or idle timer fired.

Both over implicit TLS (C{pops://}) and STLS (C{pop://} with
C{ssl_force_tls}); the STLS run also deletes a message and syncs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

from twisted.trial import unittest

from tests.interop.world import World, shared_world, simple_messages

NEOMUTT = shutil.which("neomutt")
TMUX = shutil.which("tmux")

#: An upper bound, with room for a loaded machine, on the time from C{q} to the
#: server's logout event (measured: well under a second; the bug made it the
#: login timeout, 60 s, or the idle timeout, 600 s).
QUIT_BOUND = 5.0


def build(world: World) -> None:
    world.add_user("nmtls", "nmtlspw", simple_messages("nmtls", 3))
    world.add_user("nmstls", "nmstlspw", simple_messages("nmstls", 3))


class NeoMuttTests(unittest.TestCase):
    skip = (None if NEOMUTT and TMUX
            else "neomutt and tmux are needed (Debian packages neomutt, tmux)")

    def setUp(self) -> None:
        self.world = shared_world(__name__, build)
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.socket = "popservice-test-%d" % os.getpid()
        self.session = "neomutt"
        self.addCleanup(self.tmux, "kill-server")

    def tmux(self, *args: str) -> str:
        assert TMUX
        result = subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        return result.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def wait_screen(self, pattern: str, seconds: float = 30.0) -> str:
        deadline = time.monotonic() + seconds
        while True:
            text = self.screen()
            if re.search(pattern, text):
                return text
            if time.monotonic() > deadline:
                self.fail("NeoMutt never showed %r; screen:\n%s\n--- server log ---\n%s"
                          % (pattern, text, self.world.log_tail()))
            time.sleep(0.1)

    def start_neomutt(self, url: str, user: str, *settings: str) -> None:
        muttrc = os.path.join(self.home, "muttrc")
        lines = [
            'set spoolfile="%s"' % url,
            'set folder="%s"' % url,
            'set pop_pass="%s"' % self.world.users[user].password,
            # Trust the test certificate (GnuTLS: the accepted-certificates file).
            'set certificate_file="%s"' % self.world.cert,
            # No prompt on leaving: delete marked messages, keep read ones there.
            "set delete=yes",
            "set move=no",
            'set header_cache=""',
            'set mbox="%s/mbox"' % self.home,
            'set record=""',
            'set tmpdir="%s"' % self.home,
            *settings,
        ]
        with open(muttrc, "w") as f:
            f.write("\n".join(lines) + "\n")
        assert NEOMUTT
        self.tmux("new-session", "-d", "-s", self.session, "-x", "150", "-y", "40",
                  "-e", "HOME=" + self.home, "-e", "TERM=xterm", "-e", "LANG=C.UTF-8",
                  "%s -n -F %s" % (NEOMUTT, muttrc))

    def log_lines(self, user: str, event: str) -> list[str]:
        return [line for line in self.world.log_text().splitlines()
                if "pop3 %s:" % event in line and ("user=%s" % user in line or "attempted=%s" % user in line)]

    def session_with(self, user: str, url: str, *settings: str, delete_first: bool = False) -> float:
        """Open the mailbox in NeoMutt, optionally delete message 1, quit; the seconds until logout."""
        self.start_neomutt(url, user, *settings)
        self.wait_screen(r"Msgs:3")
        logins = self.log_lines(user, "login")
        self.assertEqual(len(logins), 1, logins)
        self.assertIn("method=SCRAM-SHA-256", logins[0])
        self.assertEqual(self.log_lines(user, "login_failed"), [])
        if delete_first:
            self.tmux("send-keys", "-t", self.session, "d")
            self.wait_screen(r"Del:1")
        before = len(self.log_lines(user, "logout"))
        self.tmux("send-keys", "-t", self.session, "q")
        sent = time.monotonic()
        while len(self.log_lines(user, "logout")) == before:
            if time.monotonic() - sent > 30:
                self.fail("no logout event 30 s after q:\n%s" % (self.world.log_tail(),))
            time.sleep(0.02)
        elapsed = time.monotonic() - sent
        logout = self.log_lines(user, "logout")[-1]
        self.assertIn("reason=quit", logout)
        self.assertIn("tls=True", logout)
        return elapsed

    def test_implicit_tls_default_login(self) -> None:
        url = "pops://nmtls@localhost:%d/" % self.world.tls_port
        elapsed = self.session_with("nmtls", url)
        self.assertLess(elapsed, QUIT_BOUND, "logout %.2f s after q" % elapsed)
        self.assertEqual(self.world.present("nmtls"), [1, 2, 3])

    def test_stls_default_login_delete_and_sync(self) -> None:
        url = "pop://nmstls@localhost:%d/" % self.world.port
        elapsed = self.session_with("nmstls", url, "set ssl_force_tls=yes", "set ssl_starttls=yes",
                                    delete_first=True)
        self.assertLess(elapsed, QUIT_BOUND, "logout %.2f s after q" % elapsed)
        self.assertEqual(self.world.present("nmstls"), [2, 3])
