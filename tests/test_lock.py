"""Tests for popservice.stores.lock.FcntlMailboxLock."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popservice.interfaces import IMailboxLock, MailboxInUse, MailboxUnavailable
from popservice.stores.lock import FcntlMailboxLock

# A process that takes the lock, says so, and holds it until killed.
HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
sys.stdout.write("locked\n")
sys.stdout.flush()
time.sleep(120)
"""

# A process that tries the lock once and reports "free" or "busy".
PROBE = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    print("busy")
else:
    print("free")
"""


def probe(path: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


class FcntlMailboxLockTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "popservice.lock")

    def make(self) -> FcntlMailboxLock:
        lock = FcntlMailboxLock(self.path)
        self.addCleanup(lock.release_now)
        return lock

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IMailboxLock, FcntlMailboxLock(self.path)))

    def test_acquire_creates_private_file(self) -> None:
        lock = self.make()
        self.assertFalse(os.path.exists(self.path))
        self.successResultOf(lock.acquire())
        self.assertTrue(lock.held)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_same_process_conflict(self) -> None:
        """flock is per open file description: a second lock in this process conflicts."""
        first, second = self.make(), self.make()
        self.successResultOf(first.acquire())
        self.failureResultOf(second.acquire(), MailboxInUse)
        self.assertFalse(second.held)
        self.successResultOf(first.release())
        self.successResultOf(second.acquire())
        self.failureResultOf(first.acquire(), MailboxInUse)

    def test_acquire_twice_and_release_twice(self) -> None:
        lock = self.make()
        self.successResultOf(lock.acquire())
        self.successResultOf(lock.acquire())
        self.successResultOf(lock.release())
        self.successResultOf(lock.release())
        self.assertFalse(lock.held)
        self.assertEqual(probe(self.path), "free")

    def test_other_process_sees_our_lock(self) -> None:
        lock = self.make()
        self.assertEqual(probe(self.path), "free")
        self.successResultOf(lock.acquire())
        self.assertEqual(probe(self.path), "busy")
        lock.release_now()
        self.assertEqual(probe(self.path), "free")

    def test_holder_killed_frees_lock(self) -> None:
        """A holder killed with SIGKILL leaves no stale lock behind."""
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, self.path],
                                  stdout=subprocess.PIPE, text=True)
        self.addCleanup(holder.wait)
        self.addCleanup(lambda: holder.poll() is None and holder.kill())
        assert holder.stdout is not None
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        self.addCleanup(holder.stdout.close)
        lock = self.make()
        self.failureResultOf(lock.acquire(), MailboxInUse)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        self.assertEqual(holder.returncode, -signal.SIGKILL)
        # the lock file is still there, but nothing holds it
        self.assertTrue(os.path.exists(self.path))
        deadline = time.monotonic() + 10
        while True:
            d = lock.acquire()
            result = []
            d.addBoth(result.append)
            if lock.held or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertTrue(lock.held, result)

    def test_unopenable_lock_file(self) -> None:
        lock = FcntlMailboxLock(os.path.join(self.dir, "missing-dir", "popservice.lock"))
        self.failureResultOf(lock.acquire(), MailboxUnavailable)
        self.assertFalse(lock.held)

    def test_symlink_not_followed(self) -> None:
        target = os.path.join(self.dir, "elsewhere")
        os.symlink(target, self.path)
        lock = self.make()
        self.failureResultOf(lock.acquire(), MailboxUnavailable)
        self.assertFalse(os.path.exists(target))
