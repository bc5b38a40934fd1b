"""
C{twistd pop3}: options and service construction.

    twistd -n pop3 --mail maildir:/srv/mail/%u --auth passwd-file:/etc/popservice/passwd \\
        --listen tcp:110 --listen ssl:995:privateKey=key.pem:certKey=cert.pem \\
        --tls-certificate cert.pem --tls-key key.pem

Endpoints are Twisted endpoint strings and C{--auth} is Twisted's strcred, so
everything Twisted can listen on or check credentials with works here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from typing import Any, cast

from OpenSSL import crypto
from twisted.application import service, strports
from twisted.cred import checkers, credentials, strcred
from twisted.internet import ssl
from twisted.internet.interfaces import IReactorCore
from twisted.python import usage

from popservice.auth.cache import AuthCache, install_auth_cache
from popservice.interfaces import IMailDelivery, IMailStore
from popservice.server.events import Observers
from popservice.server.factory import POP3ServerFactory, ServerConfig, makeServer
from popservice.server.lifecycle import ServerLifecycle
from popservice.server.listeners import ListenerFactory, listener_name
from popservice.server.policy import Policy, parse_networks
from popservice.server.startup import ListeningServices, check_options, passwd_uid
from popservice.server.trace import Tracer
from popservice.server.worker import (
    AdoptingReactor,
    ParentWatch,
    adopted_description,
    connection_share,
    worker_fds,
)
from popservice.server.workerlog import route
from popservice.server.workers import ADOPTABLE_KINDS, supervisor
from popservice.tlsutil import ReloadableServerTLS, usable

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
               lock_grace: float = 60.0, allow_symlinks: bool = False,
               owner_of: Callable[[str], str | None] | None = None) -> IMailStore:
    """
    A mail store from C{--mail}: C{maildir:TEMPLATE} or C{postgresql://...} (a libpq URL).
    Maildirs: C{allow_symlinks} out of the mail root, C{owner_of} a user gives the uid that must own
    their Maildir (L{popservice.stores.maildir.MaildirStore}).
    """
    kind = description.split(":", 1)[0]
    store: IMailStore
    if kind == "maildir":
        from popservice.stores.maildir import MaildirStore

        store = MaildirStore.from_description(description, lock_policy=lock, allow_symlinks=allow_symlinks,
                                              owner_of=owner_of)
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


def lmtp_service(options: Any, factory: POP3ServerFactory, fd: int | None = None) -> service.IService:
    """
    The C{--lmtp} listener, delivering into the POP3 server's own store (homes from its checkers).
    C{fd}: a worker's socket from its parent (L{popservice.server.workers}).
    """
    from popservice.delivery.lmtp import LMTPFactory

    realm: Any = factory.portal.realm  # popservice.server.realm.MailRealm
    served = LMTPFactory(realm.store, realm.directory)
    if fd is not None:
        from twisted.internet import reactor

        return strports.service(adopted_description(options["lmtp"]), served,
                                reactor=cast(IReactorCore, AdoptingReactor(reactor, fd)))
    return strports.service(with_backlog(options["lmtp"]), served)


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
        ["auth-cache-ttl", None, 0, "Seconds a successful USER/PASS or SASL PLAIN login is remembered, "
         "so the same user and password are not verified again (Dovecot's auth_cache_ttl); 0: no cache. "
         "Kept as a keyed hash, never the password; a reloaded passwd-file forgets it.", float],
        ["auth-cache-negative-ttl", None, 0, "With --auth-cache-ttl: seconds a failed password is "
         "remembered (failure delays still apply); 0: failures are not.", float],
        ["auth-cache-size", None, 10000, "With --auth-cache-ttl: users remembered at most (the least "
         "recently used leave first), and as many failures.", int],
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
         "and on implicit TLS (ssl:, --listen-tls) and verify them against these (for SASL EXTERNAL)."],
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
        ["trace-user", None, None, "Write every session of this user, both directions, to a file per "
         "session in --trace-dir (mode 0600); passwords, SASL data and OAuth tokens are redacted, "
         "RETR/TOP bodies written as their size."],
        ["trace-dir", None, None, "Existing directory for the --trace-user files (writable by the uid "
         "the server runs as)."],
        ["client-quirks", None, "", "Comma-separated client workarounds (Dovecot's pop3_workarounds): "
         "outlook-no-nuls leaves NUL bytes out of RETR/TOP bodies (LIST sizes then disagree with what is "
         "sent, as in Dovecot); oe-ns-eoh ends a TOP of an all-header message with the missing empty line."],
        ["metrics", None, None, "Serve Prometheus metrics over HTTP on this endpoint, e.g. "
         "tcp:9110:interface=127.0.0.1 (needs prometheus_client: pip install 'popservice[metrics]')."],
        ["log-format", None, "text", "Log lines: text (twistd's) or json (one object per line)."],
        ["runtime-dir", None, None, "Private directory (0700) for this server's control socket "
         "(session-PID.sock), where other popservice processes sharing the mailboxes (--workers) ask it "
         "to end sessions idle past --lock-grace; default: $POPSERVICE_RUNTIME_DIR, else none."],
        ["shutdown-grace", None, 10, "At stop (SIGTERM), seconds sessions get to end: UPDATE completes, "
         "other sessions get -ERR [SYS/TEMP] at their next command; then the rest are aborted.", float],
        ["workers", None, 1, "Worker processes serving the same sockets, bound by a supervising parent "
         "(1: this process serves). --max-connections(-per-ip) are shared out among them.", int],
        ["worker-index", None, None, "Internal (set by --workers): this worker's number.", int],
        ["worker-fds", None, None, "Internal (set by --workers): the listening sockets from the parent."],
    ]
    optFlags = [
        ["allow-plaintext-auth", None, "Accept passwords without TLS from any address (insecure)."],
        ["no-apop", None, "Do not offer APOP."],
        ["untrusted-loopback", None, "Treat loopback peers like any other (behind a local TLS proxy)."],
        ["trace-bodies", None, "With --trace-user: write RETR/TOP bodies too (mail content), not only "
         "their size."],
        ["allow-mail-symlinks", None, "Open a Maildir even when a symbolic link leads it (or its cur/new/"
         "tmp) out of the mail root: the --mail template's part before %u, or the home for ~."],
        ["ignore-mail-owner", None, "Open a Maildir whoever owns it (by default it must belong to the "
         "user's uid when the passwd-file gives one)."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []
        self["listen-tls"] = []
        #: the arguments as given (--workers gives them to each worker)
        self.arguments: list[str] = []

    def parseOptions(self, options: Any = None) -> None:
        self.arguments = list(sys.argv[1:] if options is None else options)
        usage.Options.parseOptions(self, options)

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:110 or ssl:995:privateKey=k.pem:certKey=c.pem (repeatable)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_listen_tls(self, description: str) -> None:
        """
        Endpoint to listen on with implicit TLS (RFC 8314) using --tls-certificate/--tls-key,
        e.g. systemd:domain=INET:index=1 (socket activation) or tcp:995 (repeatable).
        """
        self["listen-tls"].append(description)

    def postOptions(self) -> None:
        if not self["listen"] and not self["listen-tls"]:
            self["listen"] = ["tcp:110"]
        if not self.get("credCheckers"):
            raise usage.UsageError("give at least one --auth, e.g. --auth passwd-file:/etc/popservice/passwd")
        if bool(self["tls-certificate"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-certificate and --tls-key go together")
        if self["listen-tls"] and not self["tls-certificate"]:
            raise usage.UsageError("--listen-tls needs --tls-certificate and --tls-key")
        if not 0 <= self["shutdown-grace"] < float("inf"):
            raise usage.UsageError("--shutdown-grace must be a number of seconds, 0 or more")
        self.check_workers()
        expire = str(self["expire"]).upper()
        if expire != "NEVER" and not expire.isdigit():
            raise usage.UsageError("--expire must be NEVER or a number of days")
        self["expire"] = None if expire == "NEVER" else int(expire)
        if self["lock"] not in ("exclusive", "none"):
            raise usage.UsageError("--lock must be exclusive or none")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        if self["metrics"] and importlib.util.find_spec("prometheus_client") is None:
            raise usage.UsageError("--metrics needs prometheus_client: pip install 'popservice[metrics]'")
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
        # All the rest is checked (and the files read) here too: from makeService an error is a traceback.
        try:
            check_options(self)
        except ValueError as e:
            raise usage.UsageError(str(e))
        if self["tls-certificate"]:
            try:
                self["tls-options"] = usable(load_tls_options(self["tls-certificate"], self["tls-key"],
                                                              client_ca=self["tls-client-ca"]))
            except (OSError, ValueError, crypto.Error) as e:
                raise usage.UsageError("cannot load TLS certificate/key: %s" % (e,))
        elif self["tls-client-ca"]:
            raise usage.UsageError("--tls-client-ca needs --tls-certificate and --tls-key")
        self["sasl-configuration"] = sasl_configuration(self)

    def check_workers(self) -> None:
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["workers"] == 1 or self["worker-fds"] is not None:
            return
        for description in [*self["listen"], *self["listen-tls"], *([self["lmtp"]] if self["lmtp"] else [])]:
            kind = description.split(":", 1)[0].strip().lower()
            if kind not in ADOPTABLE_KINDS:
                raise usage.UsageError("--workers: cannot pass %s listeners to workers (only %s)"
                                       % (description, ", ".join(sorted(ADOPTABLE_KINDS))))


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
    tls_context: ReloadableServerTLS | None = None
    if options["tls-certificate"]:
        certificate, key, client_ca = options["tls-certificate"], options["tls-key"], options["tls-client-ca"]
        try:
            # Read again on SIGHUP (popservice.server.lifecycle); STLS and --listen-tls use it.
            tls_context = ReloadableServerTLS(lambda: load_tls_options(certificate, key, client_ca=client_ca),
                                              "STLS/--listen-tls %s" % (certificate,),
                                              current=options.get("tls-options"))  # read by postOptions
        except (OSError, ValueError, crypto.Error) as e:
            raise usage.UsageError("cannot load TLS certificate/key: %s" % (e,))
    elif options["tls-client-ca"]:
        raise usage.UsageError("--tls-client-ca needs --tls-certificate and --tls-key")
    mechanisms, services = options.get("sasl-configuration") or sasl_configuration(options)
    # A worker of --workers N serves its part of the caps.
    share = (options.get("workers") or 1) if options.get("worker-fds") is not None else 1
    policy = Policy(allow_plaintext_auth=bool(options["allow-plaintext-auth"]),
                    trusted_networks=options["trusted-networks"],
                    failure_delay=options["failure-delay"], max_failures=options["max-failures"],
                    max_connections=connection_share(options["max-connections"], share),
                    max_connections_per_ip=connection_share(options["max-connections-per-ip"], share),
                    handshake_timeout=options["handshake-timeout"], login_delay=options["login-delay"],
                    expire=options["expire"], trust_loopback=not options["untrusted-loopback"])
    config = ServerConfig(timeout=options["timeout"], login_timeout=options["login-timeout"],
                          tls_context=tls_context, apop=not options["no-apop"], policy=policy,
                          sasl=mechanisms, sasl_services=services)
    if options["hostname"]:
        config.hostname = options["hostname"]
    if options.get("trace-user"):
        config.trace = Tracer(options["trace-user"], options["trace-dir"],
                              bodies=bool(options["trace-bodies"]))
    config.client_quirks = frozenset(options.get("client-quirks") or ())
    owner_of = None if options.get("ignore-mail-owner") else passwd_uid(options["credCheckers"])
    store = make_store(options["mail"], options["lock"], lease_ttl=options["lease-ttl"],
                       lock_grace=options["lock-grace"],
                       allow_symlinks=bool(options.get("allow-mail-symlinks")), owner_of=owner_of)
    factory = makeServer(store, options["credCheckers"], config,
                         lock_grace=options["lock-grace"], exclusive=options["lock"] == "exclusive",
                         max_sessions=options["max-sessions-per-user"],
                         runtime_dir=options.get("runtime-dir") or os.environ.get("POPSERVICE_RUNTIME_DIR"))
    if options.get("auth-cache-ttl"):
        # USER/PASS and SASL PLAIN answers remembered (popservice.auth.cache).
        install_auth_cache(factory.portal, AuthCache(options["auth-cache-ttl"],
                                                     options["auth-cache-negative-ttl"],
                                                     options["auth-cache-size"], clock=factory.clock))
    return factory


#: Twisted listens with a backlog of 50: a burst of connections then loses
#: SYNs and clients stall 1-3 s.  Unless the endpoint string says otherwise:
DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """Add C{backlog=DEFAULT_BACKLOG} to tcp/ssl endpoint strings that set none."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return "%s:backlog=%d" % (description, DEFAULT_BACKLOG)
    return description


def observability(options: Any, factory: POP3ServerFactory, top: ListeningServices) -> None:
    """C{--log-format json}; C{--metrics ENDPOINT}: a metrics observer beside the log, its HTTP listener."""
    if options.get("worker-fds") is None:  # (a worker's parent writes)
        from popservice.server.logformat import use_classic_text_logs, use_json_logs

        if options["log-format"] == "json":
            use_json_logs()
        else:
            use_classic_text_logs()
    if options["metrics"]:
        from prometheus_client import disable_created_metrics

        from popservice.server.metrics import MetricsObserver, metrics_site

        # No *_created series beside every counter and histogram (they double the output; the process's
        # start time is process_start_time_seconds).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        listeners = [*options["listen"], *options["listen-tls"]]
        metrics = MetricsObserver(listeners=[listener_name(d) for d in listeners])
        factory.observer = Observers([factory.observer, metrics])
        site: Any = metrics_site(metrics.registry)
        if options.get("worker-fds") is not None:
            # A worker of --workers N: its parent reads it (popservice.server.gathermetrics).
            from popservice.server.gathermetrics import ExpositionFactory

            site = ExpositionFactory(metrics.registry)
        top.listen(options["metrics"], strports.service(options["metrics"], site))


def workers_parent(options: Any) -> service.IService:
    """
    C{--workers N}: the parent binds every listener, then supervises N workers
    serving them (L{popservice.server.workers}).
    """
    if options["log-format"] == "json":
        from popservice.server.logformat import use_json_logs

        use_json_logs()
    lmtp = [options["lmtp"]] if options["lmtp"] else []
    descriptions = [*options["listen"], *options["listen-tls"], *lmtp]
    runtime_dir = options.get("runtime-dir") or os.environ.get("POPSERVICE_RUNTIME_DIR") or None
    # The workers write their log lines where ours go (twistd's options: -n, --logfile, --syslog).
    twistd_options = getattr(options, "parent", None)
    log_route = route(twistd_options, options["log-format"]) if twistd_options is not None else "records"
    return supervisor(options.arguments, [with_backlog(d) for d in descriptions], options["workers"],
                      grace=options["shutdown-grace"], runtime_dir=runtime_dir,
                      pass_runtime_dir="runtime-dir" in options and runtime_dir is None,
                      metrics=options["metrics"], log_route=log_route)


def makeService(options: Any) -> service.IService:
    fds = worker_fds(options.get("worker-fds"))
    if fds is None and options.get("workers", 1) > 1:
        return workers_parent(options)
    factory = make_factory(options)
    # A listener that cannot bind is one log line and exit status 1 (popservice.server.startup).
    top = ListeningServices()
    observability(options, factory, top)
    # Graceful stop, SIGHUP reload and systemd notifications (popservice.server.lifecycle).
    lifecycle = ServerLifecycle(factory, grace=options["shutdown-grace"], client_ca=options["tls-client-ca"])
    proxies = options["proxy-trusted-networks"]
    listeners = [(d, False) for d in options["listen"]] + [(d, True) for d in options["listen-tls"]]
    for index, (description, implicit_tls) in enumerate(listeners):
        # One shared factory; each listener names its connections (logs, metrics).
        served = ListenerFactory(factory, listener_name(description))
        reactor: Any = None
        listened = with_backlog(description)
        if fds is not None:
            # A worker of --workers N: the socket is the parent's, adopted under the same layers.
            from twisted.internet import reactor as base

            reactor = AdoptingReactor(base, fds[index])
            listened = adopted_description(description)
        if proxies:
            # PROXY headers from trusted proxies, read below TLS (popservice.server.proxy).
            from popservice.server.proxy import listening_reactor

            deadline = options["handshake-timeout"] or options["login-timeout"]
            reactor = listening_reactor(proxies, deadline, reactor=reactor, clock=factory.clock)
        # The TLS of ssl: and --listen-tls listeners is read again on SIGHUP.
        top.listen(description, lifecycle.listener(listened, served, reactor=reactor,
                                                   implicit_tls=implicit_tls))
    if options["lmtp"]:
        top.listen(options["lmtp"], lmtp_service(options, factory,
                                                 fd=fds[len(listeners)] if fds is not None else None))
    if fds is not None:
        # The worker stops (gracefully) when its parent is gone.
        top.addService(ParentWatch(options.get("worker-index") or 0))
    for checker in options["credCheckers"]:
        # Checkers that re-read their users from somewhere (--auth postgresql://) do it while serving.
        refresher = getattr(checker, "refresher", None)
        if refresher is not None:
            refresher().setServiceParent(top)
    top.addService(lifecycle)
    return top
