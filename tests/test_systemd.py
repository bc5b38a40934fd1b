"""
systemd: socket activation through Twisted's C{systemd:} endpoint (run by
C{systemd-socket-activate} with the command line of
C{contrib/systemd/popservice.service}), C{sd_notify} READY=1 and STOPPING=1
on a C{$NOTIFY_SOCKET} the test binds (a path and an abstract name), and the
unit files as C{systemd-analyze verify} sees them.
"""

from __future__ import annotations

import os
import poplib
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from typing import Any

from twisted.trial import unittest

from popservice import sdnotify
from tests.interop.world import TWISTD, World, free_port, simple_messages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(ROOT, "contrib", "systemd")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
NO_SOCKET_ACTIVATE = (None if os.access(SOCKET_ACTIVATE, os.X_OK)
                      else "systemd-socket-activate is not installed (Debian package systemd)")


def unit_settings(name: str) -> dict[str, list[str]]:
    """A unit file's settings (continuation lines joined), each key with all its values."""
    with open(os.path.join(UNITS, name)) as f:
        text = f.read().replace("\\\n", " ")
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_command(world: World) -> list[str]:
    """The service's ExecStart, its paths pointed at C{world} (systemd's %% is a %)."""
    argv = [a.replace("%%", "%") for a in shlex.split(unit_settings("popservice.service")["ExecStart"][0])]
    replacements = {"/opt/popservice/bin/twistd": TWISTD, "/srv/mail": world.mail,
                    "/etc/popservice/passwd": world.passwd, "/etc/popservice/cert.pem": world.cert,
                    "/etc/popservice/key.pem": world.key}
    out = []
    for arg in argv:
        for old, new in replacements.items():
            arg = arg.replace(old, new)
        out.append(arg)
    return out


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, case: unittest.TestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.sock.close)
        if abstract:
            name = "popservice-test-%d-%d" % (os.getpid(), time.monotonic_ns())
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="popservice-notify-")
            case.addCleanup(shutil.rmtree, directory, True)
            self.env = os.path.join(directory, "notify")
            self.sock.bind(self.env)

    def receive(self, timeout: float = 30.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.1, deadline - time.monotonic()))
            if key in message:
                return message


def launch(world: World, argv: list[str], env: dict[str, str]) -> None:
    world.process = subprocess.Popen(argv, cwd=world.root, env=env, stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(world.root, "twistd.out"), "wb"),
                                     stderr=subprocess.STDOUT)


class NotifyAddress(unittest.TestCase):
    def test_addresses(self) -> None:
        self.assertEqual(sdnotify.socket_address({"NOTIFY_SOCKET": "/run/systemd/notify"}),
                         "/run/systemd/notify")
        self.assertEqual(sdnotify.socket_address({"NOTIFY_SOCKET": "@abstract/name"}), "\0abstract/name")
        self.assertIsNone(sdnotify.socket_address({}))
        self.assertIsNone(sdnotify.socket_address({"NOTIFY_SOCKET": "vsock:2:1234"}))
        self.assertFalse(sdnotify.notify("READY=1", {}))

    def test_unreachable_socket_raises(self) -> None:
        self.assertRaises(OSError, sdnotify.notify, "READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"})


class Notify(unittest.TestCase):
    timeout = 60

    def test_ready_when_listening_stopping_at_sigterm(self) -> None:
        notify = NotifySocket(self)
        world = World("notify")
        world.add_user("carol", "carolpw", simple_messages("carol", 1))
        self.addCleanup(world.stop)
        world.port, world.tls_port = free_port(), free_port()
        launch(world, world.command_line(), dict(os.environ, NOTIFY_SOCKET=notify.env))
        ready = notify.wait_for("READY")
        self.assertEqual(ready["READY"], "1")
        # READY=1 means listening: both listeners accept at once
        plain = poplib.POP3("127.0.0.1", world.port, timeout=10)
        self.assertTrue(plain.getwelcome().startswith(b"+OK"))
        context = ssl.create_default_context(cafile=world.cert)
        secure = poplib.POP3_SSL("127.0.0.1", world.tls_port, context=context, timeout=10)
        self.assertTrue(secure.getwelcome().startswith(b"+OK"))
        plain.quit()
        secure.quit()
        assert world.process is not None
        world.process.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING")
        self.assertEqual(stopping["STOPPING"], "1")
        world.process.wait(15)


class SocketActivation(unittest.TestCase):
    skip = NO_SOCKET_ACTIVATE
    timeout = 60

    def test_the_units_command_line_socket_activated(self) -> None:
        """
        popservice.service's ExecStart under systemd-socket-activate, which
        binds the sockets (110 and 995 in popservice.socket; free ports here),
        starts the server at the first connection and hands them over.
        """
        notify = NotifySocket(self, abstract=True)
        world = World("socket-activation")
        world.add_user("carol", "carolpw", simple_messages("carol", 2))
        self.addCleanup(world.stop)
        port, tls_port = free_port(), free_port()
        argv = [SOCKET_ACTIVATE, "-l", "127.0.0.1:%d" % (port,), "-l", "127.0.0.1:%d" % (tls_port,),
                # systemd always sets LISTEN_FDNAMES (Twisted ignores the descriptors without);
                # systemd-socket-activate only when asked.
                "--fdname=popservice:popservice",
                "-E", "NOTIFY_SOCKET=" + notify.env] + unit_command(world)
        self.assertIn("systemd:domain=INET:index=0", argv)
        self.assertIn("systemd:domain=INET:index=1", argv)
        launch(world, argv, dict(os.environ))
        # It says so once both sockets are bound (and nothing else is started yet).
        deadline = time.monotonic() + 15
        while world.log_tail().count("Listening on") < 2:
            assert time.monotonic() < deadline, world.log_tail()
            time.sleep(0.02)

        def session(client: Any) -> tuple[int, bytes]:
            client.user("carol")
            client.pass_("carolpw")
            count = client.stat()[0]
            lines = client.retr(2)[1]
            client.quit()
            return count, b"\r\n".join(lines) + b"\r\n"

        # The first connection starts the server (systemd-socket-activate execs it).
        count, body = session(poplib.POP3("127.0.0.1", port, timeout=30))
        self.assertEqual(count, 2)
        self.assertEqual(body, world.users["carol"].messages[1].retr)
        self.assertEqual(notify.wait_for("READY")["READY"], "1")
        context = ssl.create_default_context(cafile=world.cert)
        count, body = session(poplib.POP3_SSL("127.0.0.1", tls_port, context=context, timeout=30))
        self.assertEqual(count, 2)
        # The server adopted the sockets: it is systemd-socket-activate's process, exec'd.
        assert world.process is not None
        with open("/proc/%d/cmdline" % (world.process.pid,), "rb") as f:
            self.assertIn(b"twistd", f.read())
        world.process.send_signal(signal.SIGTERM)
        self.assertEqual(notify.wait_for("STOPPING")["STOPPING"], "1")
        world.process.wait(15)


class UnitFiles(unittest.TestCase):
    def test_hardening_and_socket(self) -> None:
        service = unit_settings("popservice.service")
        for key, value in (("Type", "notify"), ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                           ("ProtectHome", "read-only"), ("PrivateTmp", "yes"), ("CapabilityBoundingSet", ""),
                           ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
                           ("SystemCallFilter", "@system-service"), ("User", "popservice"),
                           ("ReadWritePaths", "/srv/mail"), ("ExecReload", "/bin/kill -HUP $MAINPID")):
            self.assertEqual(service.get(key), [value], key)
        grace = re.search(r"--shutdown-grace (\d+)", service["ExecStart"][0])
        assert grace is not None
        self.assertLess(int(grace.group(1)), int(service["TimeoutStopSec"][0]))
        self.assertIn("maildir:/srv/mail/%%u", service["ExecStart"][0])
        socket_unit = unit_settings("popservice.socket")
        self.assertEqual(socket_unit["ListenStream"], ["0.0.0.0:110", "0.0.0.0:995"])

    def test_systemd_analyze_verify(self) -> None:
        if not os.access(SYSTEMD_ANALYZE, os.X_OK):
            raise unittest.SkipTest("systemd-analyze is not installed (Debian package systemd)")
        directory = tempfile.mkdtemp(prefix="popservice-units-")
        self.addCleanup(shutil.rmtree, directory, True)
        for name in ("popservice.service", "popservice.socket"):
            with open(os.path.join(UNITS, name)) as f:
                text = f.read().replace("/opt/popservice/bin/twistd", TWISTD)
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", "popservice.service",
                                 "popservice.socket"],
                                cwd=directory, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
