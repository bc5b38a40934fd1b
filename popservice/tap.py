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

from popservice.interfaces import IMailDelivery, IMailStore
from popservice.server.factory import POP3ServerFactory, ServerConfig, makeServer
from popservice.server.policy import Policy, parse_networks

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_tls_options(certificate: str, key: str, client_ca: str | None = None) -> ssl.CertificateOptions:
    """
    A server TLS context from PEM files; the certificate file may carry the
    chain.  With C{client_ca}, client certificates are requested (not required)
    and verified against it.
    """
    with open(certificate, "rb") as f:
        cert_pem = f.read()
    with open(key, "rb") as f:
        key_pem = f.read()
    certs = [crypto.load_certificate(crypto.FILETYPE_PEM, m.group(0)) for m in _PEM_CERT.finditer(cert_pem)]
    if not certs:
        raise ValueError("no certificate found in %s" % (certificate,))
    private_key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    if client_ca is None:
        return ssl.CertificateOptions(privateKey=private_key, certificate=certs[0], extraCertChain=certs[1:])
    with open(client_ca, "rb") as f:
        cas = [crypto.load_certificate(crypto.FILETYPE_PEM, m.group(0)) for m in _PEM_CERT.finditer(f.read())]
    if not cas:
        raise ValueError("no certificate found in %s" % (client_ca,))
    return ssl.CertificateOptions(privateKey=private_key, certificate=certs[0], extraCertChain=certs[1:],
                                  verify=True, caCerts=cas, requireCertificate=False)


def make_store(description: str, lock: str, *, lease_ttl: float = 60.0,
               lock_grace: float = 60.0) -> IMailStore:
    """A mail store from C{--mail}: C{maildir:TEMPLATE} or C{postgresql://...} (a libpq URL)."""
    kind = description.split(":", 1)[0]
    store: IMailStore
    if kind == "maildir":
        from popservice.stores.maildir import MaildirStore

        store = MaildirStore.from_description(description, lock_policy=lock)
        return store
    if kind in ("postgresql", "postgres"):
        try:
            from popservice.stores.postgres import PostgresStore
        except ImportError as e:
            raise usage.UsageError("--mail postgresql:// needs psycopg: pip install 'popservice[postgresql]' "
                                   "(%s)" % (e,))
        store = PostgresStore.from_description(description, lock_policy=lock, lease_ttl=lease_ttl,
                                               lock_grace=lock_grace)
        return store
    raise usage.UsageError("unknown mail store %r (supported: maildir:PATH, postgresql://...)" % (kind,))


def store_delivers(description: str) -> bool:
    """Does the C{--mail} store take deliveries (L{IMailDelivery})?  Asked of its class: nothing is opened."""
    kind = description.split(":", 1)[0]
    cls: type
    if kind == "maildir":
        from popservice.stores.maildir import MaildirStore as cls
    elif kind in ("postgresql", "postgres"):
        try:
            from popservice.stores.postgres import PostgresStore as cls
        except ImportError:
            return True  # make_store says what is missing
    else:
        return False
    return IMailDelivery.implementedBy(cls)


def lmtp_service(options: Any, factory: POP3ServerFactory) -> service.IService:
    """The C{--lmtp} listener, delivering into the POP3 server's own store (homes from its checkers)."""
    from popservice.delivery.lmtp import LMTPFactory

    realm: Any = factory.portal.realm  # popservice.server.realm.MailRealm
    return strports.service(with_backlog(options["lmtp"]), LMTPFactory(realm.store, realm.directory))


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
         "Mail store: maildir:TEMPLATE, %u = user name (validated), ~ = home from the passwd-file; "
         "or postgresql://user@host/db (many front ends, one database)."],
        ["lmtp", None, None, "Also serve LMTP (RFC 2033) on this endpoint, delivering into the --mail "
         "store, e.g. unix:/run/popservice/lmtp or tcp:24:interface=127.0.0.1."],
        ["tls-certificate", None, None, "PEM certificate (with chain) for STLS."],
        ["tls-key", None, None, "PEM private key for STLS."],
        ["timeout", "t", 600, "Idle timeout in seconds (never below 600 once logged in).", float],
        ["login-timeout", None, 60, "Seconds from connect within which login must complete (0: none).",
         float],
        ["hostname", None, None, "Host name used in the greeting (default: this host's name)."],
        ["lock", None, "exclusive", "Mailbox session lock: exclusive (RFC 1939) or none."],
        ["lease-ttl", None, 60, "With --mail postgresql://: seconds a session's lock lives without "
         "renewal (renewed every third); a crashed front end's mailboxes are free after this.", float],
        ["lock-grace", None, 60, "Seconds of idleness after which a new login takes a locked "
         "mailbox over from its old session.", float],
        ["trusted-networks", None, "", "Comma-separated networks where plaintext logins are "
         "allowed without TLS (loopback always is)."],
        ["failure-delay", None, 1.0, "Seconds before answering a failed login; doubles per failure.",
         float],
        ["max-failures", None, 5, "Failed logins before the connection is closed.", int],
        ["max-sessions-per-user", None, 10, "With --lock none: concurrent sessions of one user.", int],
        ["max-connections", None, 10000, "Concurrent connections in all.", int],
        ["max-connections-per-ip", None, 50, "Concurrent connections from one untrusted address.", int],
        ["handshake-timeout", None, 10, "Seconds a TLS handshake (or a PROXY header) may take.", float],
        ["proxy-trusted-networks", None, "", "Comma-separated networks of trusted proxies (HAProxy "
         "send-proxy/send-proxy-v2): connections from them must start with a PROXY header, whose "
         "client address is then used; others are served directly."],
        ["login-delay", None, 0, "RFC 2449 LOGIN-DELAY: seconds between two logins of a user, "
         "enforced (per-user: passwd-file extra field login_delay=N).", int],
        ["sasl", None, "auto", "SASL mechanisms for AUTH, comma-separated, in order of preference "
         "(PLAIN, LOGIN, CRAM-MD5, DIGEST-MD5, SCRAM-SHA-1, SCRAM-SHA-256, EXTERNAL, OAUTHBEARER, "
         "XOAUTH2), 'none', or 'auto': what every user's stored secret supports."],
        ["tls-client-ca", None, None, "PEM CA certificate(s): request TLS client certificates on STLS "
         "and verify them against these (for SASL EXTERNAL)."],
        ["external-identity", None, "cn", "How EXTERNAL maps a client certificate to a user: "
         "cn, email or email-localpart."],
        ["oauth-keys", None, None, "PEM public key/certificate or JWKS file validating OAUTHBEARER/"
         "XOAUTH2 JWT bearer tokens (offline)."],
        ["oauth-issuer", None, None, "Required 'iss' of bearer tokens."],
        ["oauth-audience", None, None, "Accepted 'aud' of bearer tokens."],
        ["oauth-user-claim", None, "sub", "The token claim naming the user."],
        ["master-users", None, "", "Comma-separated users allowed to log in as others with a PLAIN "
         "authorization id."],
        ["expire", None, "NEVER", "RFC 2449 EXPIRE, enforced: NEVER, 0 (retrieved messages are deleted "
         "at QUIT) or N days after first retrieval (at the user's next login, and by 'popservice "
         "expire' run periodically); per user: passwd-file extra field expire=N."],
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
        if expire != "NEVER" and not expire.isdigit():
            raise usage.UsageError("--expire must be NEVER or a number of days")
        self["expire"] = None if expire == "NEVER" else int(expire)
        if self["lock"] not in ("exclusive", "none"):
            raise usage.UsageError("--lock must be exclusive or none")
        if self["lmtp"] and not store_delivers(self["mail"]):
            raise usage.UsageError("--lmtp needs a --mail store that takes deliveries (IMailDelivery): "
                                   "maildir:TEMPLATE or postgresql://..., not %r" % (self["mail"],))
        for checker in self["credCheckers"]:
            _bytes_users(checker)
        try:
            self["trusted-networks"] = parse_networks(self["trusted-networks"])
        except ValueError as e:
            raise usage.UsageError("--trusted-networks: %s" % (e,))
        try:
            self["proxy-trusted-networks"] = parse_networks(self["proxy-trusted-networks"])
        except ValueError as e:
            raise usage.UsageError("--proxy-trusted-networks: %s" % (e,))


def sasl_configuration(options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """C{--sasl} and the services mechanisms need, from options."""
    from popservice.sasl import server as sasl_server

    services: dict[str, Any] = {"external_identity": options["external-identity"]}
    if options["master-users"]:
        services["master_users"] = {u.strip() for u in options["master-users"].split(",") if u.strip()}
    if options["oauth-keys"]:
        from popservice.auth.tokens import JWTValidator

        try:
            services["token_validator"] = JWTValidator.from_file(
                options["oauth-keys"], issuer=options["oauth-issuer"], audience=options["oauth-audience"],
                user_claim=options["oauth-user-claim"])
        except (OSError, ValueError) as e:
            raise usage.UsageError("--oauth-keys: %s" % (e,))
    text = options["sasl"]
    if text.lower() == "auto":
        passwd = next((c for c in options["credCheckers"] if hasattr(c, "records")), None)
        text = (sasl_server.mechanisms_for_checker(passwd) if passwd is not None else "PLAIN,LOGIN")
        if services.get("token_validator") is not None:
            text += ",OAUTHBEARER,XOAUTH2"
        if options["tls-client-ca"]:
            text = "EXTERNAL," + text
    try:
        mechanisms = sasl_server.mechanisms_from_option(text)
    except ValueError as e:
        raise usage.UsageError("--sasl: %s" % (e,))
    problems = sasl_server.missing_services(mechanisms, services, client_ca=bool(options["tls-client-ca"]))
    if problems:
        raise usage.UsageError("--sasl: " + "; ".join(problems))
    return mechanisms, services


def make_factory(options: Any) -> POP3ServerFactory:
    tls_context: ssl.CertificateOptions | None = None
    if options["tls-certificate"]:
        try:
            tls_context = load_tls_options(options["tls-certificate"], options["tls-key"],
                                           client_ca=options["tls-client-ca"])
        except (OSError, ValueError, crypto.Error) as e:
            raise usage.UsageError("cannot load TLS certificate/key: %s" % (e,))
    elif options["tls-client-ca"]:
        raise usage.UsageError("--tls-client-ca needs --tls-certificate and --tls-key")
    mechanisms, services = sasl_configuration(options)
    policy = Policy(allow_plaintext_auth=bool(options["allow-plaintext-auth"]),
                    trusted_networks=options["trusted-networks"],
                    failure_delay=options["failure-delay"], max_failures=options["max-failures"],
                    max_connections=options["max-connections"],
                    max_connections_per_ip=options["max-connections-per-ip"],
                    handshake_timeout=options["handshake-timeout"], login_delay=options["login-delay"],
                    expire=options["expire"], trust_loopback=not options["untrusted-loopback"])
    config = ServerConfig(timeout=options["timeout"], login_timeout=options["login-timeout"],
                          tls_context=tls_context, apop=not options["no-apop"], policy=policy,
                          sasl=mechanisms, sasl_services=services)
    if options["hostname"]:
        config.hostname = options["hostname"]
    store = make_store(options["mail"], options["lock"], lease_ttl=options["lease-ttl"],
                       lock_grace=options["lock-grace"])
    return makeServer(store, options["credCheckers"], config,
                      lock_grace=options["lock-grace"], exclusive=options["lock"] == "exclusive",
                      max_sessions=options["max-sessions-per-user"])


#: Twisted listens with a backlog of 50: a burst of connections then loses
#: SYNs and clients stall 1-3 s.  Unless the endpoint string says otherwise:
DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """Add C{backlog=DEFAULT_BACKLOG} to tcp/ssl endpoint strings that set none."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return "%s:backlog=%d" % (description, DEFAULT_BACKLOG)
    return description


def makeService(options: Any) -> service.IService:
    factory = make_factory(options)
    top = service.MultiService()
    proxies = options["proxy-trusted-networks"]
    for description in options["listen"]:
        if proxies:
            # PROXY headers from trusted proxies, read below TLS (popservice.server.proxy).
            from popservice.server.proxy import proxy_service

            deadline = options["handshake-timeout"] or options["login-timeout"]
            proxy_service(with_backlog(description), factory, proxies, deadline,
                          clock=factory.clock).setServiceParent(top)
        else:
            strports.service(with_backlog(description), factory).setServiceParent(top)
    if options["lmtp"]:
        lmtp_service(options, factory).setServiceParent(top)
    return top
