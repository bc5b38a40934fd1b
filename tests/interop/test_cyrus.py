"""
Cyrus SASL's own client, ``pop3test`` (Debian ``cyrus-clients`` with
``libsasl2-modules``), against a real ``twistd pop3``: PLAIN, LOGIN, CRAM-MD5
and SCRAM-SHA-256, with and without an authorization identity (``-u``, which
Cyrus puts in the SCRAM GS2 header as ``n,a=USER,``), over STLS and implicit
TLS.  Each run logs in, sends STAT and QUIT, and must see its answers.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial import unittest

from tests.interop.world import World, run, shared_world, simple_messages

POP3TEST = next((p for p in ("/usr/lib/cyrus/bin/pop3test", shutil.which("pop3test") or "")
                 if p and os.path.exists(p)), None)


def build(world: World) -> None:
    world.add_user("cyrususer", "cyruspw", simple_messages("cyrususer", 2))


class CyrusPop3test(unittest.TestCase):
    skip = None if POP3TEST else "Cyrus pop3test is not installed (Debian cyrus-clients, libsasl2-modules)"

    def setUp(self) -> None:
        self.world = shared_world(__name__, build)

    def pop3test(self, mechanism: str, authzid: bool, implicit_tls: bool) -> tuple[int, str]:
        assert POP3TEST
        argv = [POP3TEST, "-m", mechanism, "-a", "cyrususer", "-w", "cyruspw"]
        if authzid:
            argv += ["-u", "cyrususer"]
        if implicit_tls:
            argv += ["-p", str(self.world.tls_port), "-s"]
        else:
            argv += ["-p", str(self.world.port), "-t", ""]
        # pop3test checks the certificate against the system store: trust ours for this run.
        env = dict(os.environ, SSL_CERT_FILE=self.world.cert)
        p = run(argv + ["localhost"], input=b"STAT\r\nQUIT\r\n", env=env)
        return p.returncode, (p.stdout + p.stderr).decode("utf-8", "replace")

    def check(self, mechanism: str) -> None:
        for implicit_tls in (False, True):
            for authzid in (False, True):
                code, out = self.pop3test(mechanism, authzid, implicit_tls)
                where = "%s %s %s" % (mechanism, "implicit TLS" if implicit_tls else "STLS",
                                      "-u" if authzid else "no -u")
                self.assertIn("Authenticated.", out, where + "\n" + out)
                after = out.split("Authenticated.", 1)[1]
                self.assertIn("+OK 2 ", after, where + "\n" + out)  # the STAT answer

    def test_scram_sha256(self) -> None:
        self.check("SCRAM-SHA-256")

    def test_plain(self) -> None:
        self.check("PLAIN")

    def test_login(self) -> None:
        self.check("LOGIN")

    def test_cram_md5(self) -> None:
        self.check("CRAM-MD5")
