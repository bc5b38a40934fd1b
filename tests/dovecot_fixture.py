"""
A private Dovecot POP3 server for the client tests.

L{get_dovecot} starts one instance per test process (lazily, on first use)
with a configuration generated under a temporary directory: loopback only,
free ports for plaintext/STLS and implicit TLS, a self-signed certificate
(CN/SAN localhost and 127.0.0.1), C{{PLAIN}} passwords in a passwd-file, mail
accessed as nobody/nogroup, index and control files outside the Maildirs.  It
is stopped at interpreter exit.  L{skip_reason} says why it cannot run.

Users are added and mailboxes reset while it runs (Dovecot re-reads the
passwd-file when it changes); messages are stored with LF line ends.
"""

from __future__ import annotations

import atexit
import datetime
import grp
import ipaddress
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

DOVECOT = "/usr/sbin/dovecot"
MAIL_USER = "nobody"
MAIL_GROUP = "nogroup"
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-256")
#: Users known from the start: Dovecot re-reads a changed passwd-file, but
#: registering everyone before it starts avoids a reload racing a login.
USERS = {"alice": "alice pw", "deleter": "pw", "bulk": "bulkpw", "keeper": "keeperpw",
         "deleting": "deletingpw", "crash": "crashpw", "mboxer": "mboxpw", "mda": "mdapw",
         "migrant": "migrantpw", "limits": "limitspw", "syncfail": "syncfailpw"}


def skip_reason() -> str | None:
    if not os.path.exists(DOVECOT):
        return f"{DOVECOT} is not installed (apt-get install dovecot-pop3d)"
    if os.geteuid() != 0:
        return "Dovecot tests need root (Dovecot runs its mail processes as nobody)"
    try:
        pwd.getpwnam(MAIL_USER)
        grp.getgrnam(MAIL_GROUP)
    except KeyError:
        return f"no {MAIL_USER}/{MAIL_GROUP} account for Dovecot's mail processes"
    return None


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def make_cert(directory: str) -> tuple[str, str]:
    """A self-signed CA-flagged certificate for localhost / 127.0.0.1 / ::1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = popservice-test-{port}
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = pop3
listen = 127.0.0.1
shutdown_clients = yes
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login cram-md5 digest-md5 scram-sha-256 apop
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/passwd
}}
mail_uid = {mail_user}
mail_gid = {mail_group}
mail_location = maildir:{root}/mail/%u:INDEX={root}/index/%u:CONTROL={root}/control/%u
mail_max_userip_connections = 100
pop3_uidl_format = %08Xu%08Xv
pop3_lock_session = no
pop3_no_flag_updates = yes
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
"""


class Dovecot:
    """One running Dovecot instance under C{root}."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.port = free_port()
        self.tls_port = free_port()
        while self.tls_port == self.port:
            self.tls_port = free_port()
        self.users: dict[str, str] = dict(USERS)
        self.conf = os.path.join(root, "dovecot.conf")
        self.uid = pwd.getpwnam(MAIL_USER).pw_uid
        self.gid = grp.getgrnam(MAIL_GROUP).gr_gid
        self.process_started = False
        for sub in ("run", "state", "mail", "index", "control", "tls"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        self.cert, self.key = make_cert(os.path.join(root, "tls"))
        os.chmod(root, 0o755)
        for sub in ("run", "state", "mail", "tls"):
            os.chmod(os.path.join(root, sub), 0o755)
        for sub in ("mail", "index", "control"):
            os.chown(os.path.join(root, sub), self.uid, self.gid)
        self._write_passwd()
        with open(self.conf, "w") as f:
            f.write(CONFIG.format(root=root, cert=self.cert, key=self.key, port=self.port,
                                  tls_port=self.tls_port, mail_user=MAIL_USER, mail_group=MAIL_GROUP))

    def _write_passwd(self) -> None:
        path = os.path.join(self.root, "passwd")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for user, pw in sorted(self.users.items()):
                f.write(f"{user}:{{PLAIN}}{pw}:::::\n")
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
        # Dovecot notices a changed passwd-file by its mtime (1 s resolution on some systems)
        st = os.stat(path)
        os.utime(path, (st.st_atime, time.time() + len(self.users)))

    def maildir(self, user: str) -> str:
        return os.path.join(self.root, "mail", user)

    def set_mailbox(self, user: str, password: str, messages: list[bytes]) -> None:
        """Create or replace C{user}'s mailbox (and Dovecot's index/UIDLs for it)."""
        if self.users.get(user) != password:
            self.users[user] = password
            self._write_passwd()
        for top in ("mail", "index", "control"):
            shutil.rmtree(os.path.join(self.root, top, user), ignore_errors=True)
        d = self.maildir(user)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(d, sub))
        base = 1700000000
        for i, content in enumerate(messages, start=1):
            name = f"{base + i}.M{i:06d}P1.fixture:2,"
            path = os.path.join(d, "cur", name)
            with open(path, "wb") as f:
                f.write(content)
            os.utime(path, (base + i, base + i))
        for dp, _dns, fns in os.walk(d):
            os.chown(dp, self.uid, self.gid)
            for fn in fns:
                os.chown(os.path.join(dp, fn), self.uid, self.gid)

    def start(self) -> None:
        subprocess.run([DOVECOT, "-c", self.conf], check=True)
        self.process_started = True
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                for port in (self.port, self.tls_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"Dovecot did not start; see {self.root}/dovecot.log")

    def stop(self) -> None:
        if not self.process_started:
            return
        self.process_started = False
        pidfile = os.path.join(self.root, "run", "master.pid")
        try:
            pid = int(open(pidfile).read().strip())
        except (OSError, ValueError):
            return
        subprocess.run(["doveadm", "-c", self.conf, "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, 9)


_instance: Dovecot | None = None


def get_dovecot() -> Dovecot:
    """The test process's Dovecot, started on first use and stopped at exit."""
    global _instance
    if _instance is None:
        root = tempfile.mkdtemp(prefix="popservice-dovecot-")
        server = Dovecot(root)
        atexit.register(_cleanup, server)
        server.start()
        _instance = server
    return _instance


def _cleanup(server: Dovecot) -> None:
    server.stop()
    if not os.environ.get("POPSERVICE_KEEP_DOVECOT"):
        shutil.rmtree(server.root, ignore_errors=True)


# --------------------------------------------------------------------------
# Messages

def message(user: str, i: int, body: bytes) -> bytes:
    return (b"From: Sender <sender@example.org>\n"
            b"To: " + user.encode() + b"@example.org\n"
            b"Subject: message %d\n" % i +
            b"Message-ID: <" + user.encode() + b".%d@popservice.test>\n" % i +
            b"\n" + body)


def varied_messages(user: str) -> list[bytes]:
    """Dots, a line over 64 KiB, 8-bit text, an empty body, ~1 MiB, a lone CR."""
    return [
        message(user, 1, b"".join(b"line %d\n" % n for n in range(1, 7))),
        message(user, 2, b".leading dot\n..two dots\n.\n..\n. space\nmiddle . dot\n.end\n"),
        message(user, 3, "Grüße – naïve ☃\n".encode() + bytes([0xA0, 0xFF]) + b" raw\n"),
        message(user, 4, b"x" * 100_000 + b"\nshort line after a 100 kB line\n"),
        message(user, 5, b""),
        message(user, 6, b"".join(b"%07d %s\n" % (n, b"y" * 60) for n in range(16_000))),
        message(user, 7, b"a line with a lone \r in it\n"),
    ]


def bulk_messages(user: str, count: int, size: int) -> list[bytes]:
    out = []
    for i in range(1, count + 1):
        head = message(user, i, b"")
        lines = []
        total = len(head)
        j = 0
        while total < size:
            j += 1
            line = b"bulk %s %06d %06d %s\n" % (user.encode(), i, j, b"z" * 40)
            if j % 50 == 0:
                line = b"." + line
            lines.append(line)
            total += len(line)
        out.append(head + b"".join(lines))
    return out
