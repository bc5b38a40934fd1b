"""
C{twistd pop3}: options and service construction.

    twistd -n pop3 --mail maildir:/srv/mail/%u --auth passwd-file:/etc/popservice/passwd \\
        --listen tcp:110 --listen ssl:995:privateKey=key.pem:certKey=cert.pem \\
        --tls-certificate cert.pem --tls-key key.pem

Endpoints are Twisted endpoint strings and C{--auth} is Twisted's strcred, so
everything Twisted can listen on or check credentials with works here.
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import crypto
from twisted.application import service, strports
from twisted.cred import checkers, credentials, strcred
from twisted.internet import ssl
from twisted.python import usage

from popservice.interfaces import IMailStore
from popservice.server.factory import POP3ServerFactory, ServerConfig, makeServer
from popservice.server.policy import Policy, parse_networks

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_tls_options(certificate: str, key: str) -> ssl.CertificateOptions:
    """A server TLS context from PEM files; the certificate file may carry the chain."""
    with open(certificate, "rb") as f:
        cert_pem = f.read()
    with open(key, "rb") as f:
        key_pem = f.read()
    certs = [crypto.load_certificate(crypto.FILETYPE_PEM, m.group(0)) for m in _PEM_CERT.finditer(cert_pem)]
    if not certs:
        raise ValueError("no certificate found in %s" % (certificate,))
    private_key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    return ssl.CertificateOptions(privateKey=private_key, certificate=certs[0], extraCertChain=certs[1:])


def make_store(description: str, lock: str) -> IMailStore:
    """A mail store from C{--mail}: C{maildir:TEMPLATE}."""
    kind = description.split(":", 1)[0]
    if kind == "maildir":
        from popservice.stores.maildir import MaildirStore

        store: IMailStore = MaildirStore.from_description(description, lock_policy=lock)
        return store
    raise usage.UsageError("unknown mail store %r (supported: maildir:PATH)" % (kind,))


def _bytes_users(checker: Any) -> None:
    """
    strcred's C{memory:} checker stores str names and passwords, while POP3
    credentials (like Twisted's own) carry bytes: store them as bytes.
    """
    if isinstance(checker, checkers.InMemoryUsernamePasswordDatabaseDontUse):
        users: dict[Any, Any] = checker.users
        checker.users = {
            (k.encode("utf-8") if isinstance(k, str) else k): (v.encode("utf-8") if isinstance(v, str) else v)
            for k, v in users.items()
        }


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = "[options]"
    longdesc = ("Serve mailboxes over POP3 (RFC 1939) with CAPA, STLS, implicit TLS and "
                "pipelining. Example: twistd -n pop3 --mail maildir:/srv/mail/%u "
                "--auth passwd-file:/etc/popservice/passwd --listen tcp:110")

    supportedInterfaces = (credentials.IUsernamePassword, credentials.IUsernameHashedPassword)

    optParameters = [
        ["mail", "m", "maildir:~/Maildir",
         "Mail store: maildir:TEMPLATE, %u = user name (validated), ~ = home from the passwd-file."],
        ["tls-certificate", None, None, "PEM certificate (with chain) for STLS."],
        ["tls-key", None, None, "PEM private key for STLS."],
        ["timeout", "t", 600, "Idle timeout in seconds (never below 600 once logged in).", float],
        ["login-timeout", None, 60, "Seconds from connect within which login must complete (0: none).",
         float],
        ["hostname", None, None, "Host name used in the greeting (default: this host's name)."],
        ["lock", None, "exclusive", "Mailbox session lock: exclusive (RFC 1939) or none."],
        ["lock-grace", None, 60, "Seconds of idleness after which a new login takes a locked "
         "mailbox over from its old session.", float],
        ["trusted-networks", None, "", "Comma-separated networks where plaintext logins are "
         "allowed without TLS (loopback always is)."],
        ["failure-delay", None, 1.0, "Seconds before answering a failed login; doubles per failure.",
         float],
        ["max-failures", None, 5, "Failed logins before the connection is closed.", int],
        ["max-connections", None, 10000, "Concurrent connections in all.", int],
        ["max-connections-per-ip", None, 50, "Concurrent connections from one untrusted address.", int],
        ["handshake-timeout", None, 10, "Seconds a TLS handshake may take.", float],
        ["login-delay", None, 0, "RFC 2449 LOGIN-DELAY: seconds between two logins of a user, "
         "enforced (per-user: passwd-file extra field login_delay=N).", int],
        ["expire", None, "NEVER", "RFC 2449 EXPIRE: NEVER or 0 (retrieved messages are deleted at "
         "QUIT); per-user: passwd-file extra field expire=N."],
    ]
    optFlags = [
        ["allow-plaintext-auth", None, "Accept passwords without TLS from any address (insecure)."],
        ["no-apop", None, "Do not offer APOP."],
        ["untrusted-loopback", None, "Treat loopback peers like any other (behind a local TLS proxy)."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:110 or ssl:995:privateKey=k.pem:certKey=c.pem (repeatable)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = ["tcp:110"]
        if not self.get("credCheckers"):
            raise usage.UsageError("give at least one --auth, e.g. --auth passwd-file:/etc/popservice/passwd")
        if bool(self["tls-certificate"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-certificate and --tls-key go together")
        expire = str(self["expire"]).upper()
        if expire not in ("NEVER", "0"):
            # EXPIRE n > 0 needs first-retrieval times kept by the store and a
            # periodic job; until then it is not offered rather than not enforced.
            raise usage.UsageError("--expire must be NEVER or 0")
        self["expire"] = None if expire == "NEVER" else int(expire)
        if self["lock"] not in ("exclusive", "none"):
            raise usage.UsageError("--lock must be exclusive or none")
        for checker in self["credCheckers"]:
            _bytes_users(checker)
        try:
            self["trusted-networks"] = parse_networks(self["trusted-networks"])
        except ValueError as e:
            raise usage.UsageError("--trusted-networks: %s" % (e,))


def make_factory(options: Any) -> POP3ServerFactory:
    tls_context: ssl.CertificateOptions | None = None
    if options["tls-certificate"]:
        try:
            tls_context = load_tls_options(options["tls-certificate"], options["tls-key"])
        except (OSError, ValueError, crypto.Error) as e:
            raise usage.UsageError("cannot load TLS certificate/key: %s" % (e,))
    policy = Policy(allow_plaintext_auth=bool(options["allow-plaintext-auth"]),
                    trusted_networks=options["trusted-networks"],
                    failure_delay=options["failure-delay"], max_failures=options["max-failures"],
                    max_connections=options["max-connections"],
                    max_connections_per_ip=options["max-connections-per-ip"],
                    handshake_timeout=options["handshake-timeout"], login_delay=options["login-delay"],
                    expire=options["expire"], trust_loopback=not options["untrusted-loopback"])
    config = ServerConfig(timeout=options["timeout"], login_timeout=options["login-timeout"],
                          tls_context=tls_context, apop=not options["no-apop"], policy=policy)
    if options["hostname"]:
        config.hostname = options["hostname"]
    store = make_store(options["mail"], options["lock"])
    return makeServer(store, options["credCheckers"], config,
                      lock_grace=options["lock-grace"], exclusive=options["lock"] == "exclusive")


def makeService(options: Any) -> service.IService:
    factory = make_factory(options)
    top = service.MultiService()
    for description in options["listen"]:
        strports.service(description, factory).setServiceParent(top)
    return top
