"""
PostgreSQL-backed C{twistd pop3} front ends, as a cluster runs them:

  - the real clients' interop tests (poplib, curl, fetchmail, mpop) run
    unchanged against a front end serving C{--mail postgresql://...};
  - two front ends over one database: a login on one gets C{-ERR [IN-USE]} on
    the other; SIGKILL of the holder frees the mailbox once its lease expires;
    a holder stalled past its lease (SIGSTOP, then SIGCONT and QUIT) deletes
    nothing.
"""

from __future__ import annotations

import os
import signal
import smtplib
import time

from twisted.trial import unittest

import tests.interop.test_curl as curl_tests
import tests.interop.test_fetchmail as fetchmail_tests
import tests.interop.test_mpop as mpop_tests
import tests.interop.test_poplib as poplib_tests
from tests import pg
from tests.interop.pgworld import LEASE_TTL, PostgresWorld
from tests.interop.world import RawPOP, World, free_port, shared_world, simple_messages


class PoplibOverPostgres(poplib_tests.PoplibTests):
    skip = pg.SKIP

    def make_world(self) -> World:
        return shared_world(__name__ + ".poplib", poplib_tests.build, world_class=PostgresWorld)


class CurlOverPostgres(curl_tests.CurlTests):
    skip = pg.SKIP or curl_tests.CurlTests.skip

    def make_world(self) -> World:
        return shared_world(__name__ + ".curl", curl_tests.build, world_class=PostgresWorld)


class FetchmailOverPostgres(fetchmail_tests.FetchmailTests):
    skip = pg.SKIP or fetchmail_tests.FetchmailTests.skip

    def make_world(self) -> World:
        return shared_world(__name__ + ".fetchmail", fetchmail_tests.build, world_class=PostgresWorld)


class MpopOverPostgres(mpop_tests.MpopTests):
    skip = pg.SKIP or mpop_tests.MpopTests.skip

    def make_world(self) -> World:
        return shared_world(__name__ + ".mpop", mpop_tests.build, world_class=PostgresWorld)


class TwoFrontEnds(unittest.TestCase):
    """Two C{twistd pop3} processes over one database (started per test: some tests kill them)."""

    skip = pg.SKIP

    def setUp(self) -> None:
        url = pg.fresh_database()
        self.lmtp_port = free_port()
        lmtp = ["--lmtp", "tcp:%d:interface=127.0.0.1" % (self.lmtp_port,)]
        self.a = PostgresWorld("front-a", lmtp, url=url)
        self.b = PostgresWorld("front-b", url=url)
        self.addCleanup(self.b.stop)
        self.addCleanup(self.a.stop)
        self.a.add_user("alice", "alicepw", simple_messages("alice", 3))
        self.b.users = self.a.users
        self.b._write_passwd()
        self.a.start()
        self.b.start()

    def login(self, world: PostgresWorld) -> tuple[RawPOP, bytes]:
        client = world.connect()
        self.addCleanup(client.close)
        return client, client.login("alice", "alicepw")

    def wait_login(self, world: PostgresWorld, seconds: float) -> tuple[RawPOP, float]:
        start = time.monotonic()
        while True:
            client, answer = self.login(world)
            if answer.startswith(b"+OK"):
                return client, time.monotonic() - start
            self.assertTrue(answer.startswith(b"-ERR [IN-USE]"), answer)
            client.close()
            if time.monotonic() - start > seconds:
                self.fail("still [IN-USE] after %.1f s" % (seconds,))
            time.sleep(0.1)

    def test_in_use_across_front_ends(self) -> None:
        a, answer = self.login(self.a)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        _, refused = self.login(self.b)
        self.assertTrue(refused.startswith(b"-ERR [IN-USE]"), refused)
        self.assertTrue(a.quit().startswith(b"+OK"))
        b, answer = self.login(self.b)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        total = sum(m.size for m in self.a.users["alice"].messages)
        self.assertEqual(b.command(b"STAT"), b"+OK 3 %d" % (total,))

    def test_sigkill_of_the_holder_frees_the_mailbox_after_the_lease(self) -> None:
        _, answer = self.login(self.a)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        os.kill(self.a.pid, signal.SIGKILL)
        self.a.process.wait(10)  # type: ignore[union-attr]
        _, refused = self.login(self.b)
        self.assertTrue(refused.startswith(b"-ERR [IN-USE]"), refused)
        client, waited = self.wait_login(self.b, LEASE_TTL + 10)
        self.assertLess(waited, LEASE_TTL + 10)
        self.assertTrue(client.command(b"STAT").startswith(b"+OK 3 "))

    def test_stalled_holder_deletes_nothing(self) -> None:
        a, answer = self.login(self.a)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertTrue(a.command(b"DELE 1").startswith(b"+OK"))
        self.assertTrue(a.command(b"DELE 2").startswith(b"+OK"))
        os.kill(self.a.pid, signal.SIGSTOP)
        try:
            b, _ = self.wait_login(self.b, LEASE_TTL + 10)  # taken over once A's lease expired
            self.assertTrue(b.command(b"STAT").startswith(b"+OK 3 "))
        finally:
            os.kill(self.a.pid, signal.SIGCONT)
        # A wakes up and QUITs: its UPDATE must not apply (it is refused, or A
        # has already noticed the lost lease and closed the session).
        try:
            answer = a.quit()
        except (ConnectionError, OSError):
            answer = b"(closed)"
        self.assertFalse(answer.startswith(b"+OK"), answer)
        self.assertEqual(self.a.present("alice"), [1, 2, 3])
        self.assertTrue(b.quit().startswith(b"+OK"))
        self.assertEqual(self.a.present("alice"), [1, 2, 3])

    def test_lmtp_through_one_retrieved_through_the_other_once(self) -> None:
        message = (b"From: mta@example.org\r\nTo: alice@example.org\r\nMessage-ID: <retry.1@example.org>\r\n"
                   b"Subject: via LMTP\r\n\r\n.a dot line\r\nbody\r\n")
        for _attempt in range(3):  # the MTA did not see the first replies: it retries
            with smtplib.LMTP("127.0.0.1", self.lmtp_port) as lmtp:
                refused = lmtp.sendmail("mta@example.org", ["alice@example.org"], message)
                self.assertEqual(refused, {})
        b, answer = self.login(self.b)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        self.assertTrue(b.command(b"STAT").startswith(b"+OK 4 "))
        status, body = b.multi(b"RETR 4")
        self.assertTrue(status.startswith(b"+OK"), status)
        self.assertEqual(body, message)
        self.assertTrue(b.quit().startswith(b"+OK"))
