"""
TLS helpers: self-signed certificates for the demo server and tests, and
server TLS contexts that can be re-read while the server runs.

L{ReloadableServerTLS} is a context factory whose every new connection uses
the current certificate and key; L{ReloadableServerTLS.reload} reads them
again and swaps them in, or keeps the old ones when the new files are
unusable.  L{ReloadingTLSReactor} gives the listeners of C{ssl:} endpoint
strings such a context factory, re-reading the files named in the string.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import endpoints
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="popservice.tls")


def make_self_signed(directory: str, hostname: str = "localhost", days: int = 825) -> tuple[str, str]:
    """
    Write C{cert.pem} and C{key.pem} (mode 0600) into C{directory} for
    C{hostname}, 127.0.0.1 and ::1; return their paths.
    """
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "popservice self-signed")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([
        x509.DNSName(hostname),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


# ---------------------------------------------------------------------------
# Reloadable server contexts
# ---------------------------------------------------------------------------


def describe_certificate(options: Any) -> str:
    """The certificate of a context factory, for log lines: its subject CN, expiry and SHA-256 fingerprint."""
    cert = getattr(options, "certificate", None)
    if cert is None:
        return "a certificate"
    subject = cert.get_subject().commonName or "?"
    expires = (cert.get_notAfter() or b"?").decode("ascii", "replace")
    return "CN=%s, expires %s, sha256 %s" % (subject, expires, cert.digest("sha256").decode("ascii"))


def usable(options: Any) -> Any:
    """
    C{options} (a L{twisted.internet.ssl.CertificateOptions}) once its context
    has been built, which checks that the private key matches the certificate.

    @raise ValueError: it cannot be used.
    """
    try:
        options.getContext()
    except SSL.Error as e:
        raise ValueError("certificate and key cannot be used together: %s" % (e,))
    return options


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ReloadableServerTLS:
    """
    A server context factory over the options C{load()} returns (a
    L{twisted.internet.ssl.CertificateOptions}): each new TLS connection
    (an implicit TLS listener's, or STLS's) uses the options current then;
    L{reload} calls C{load} again and swaps the result in.  Connections
    already established keep the context they started with.
    """

    def __init__(self, load: Callable[[], Any], label: str, current: Any = None) -> None:
        """
        @param load: reads the certificate and key; raises when they are unusable.
        @param label: what these options serve, for log lines ("STLS", "listener ssl:995").
        @param current: the options in use now (default: C{load()}); checked either way.
        @raise ValueError, OSError: the first options are unusable (L{usable}, C{load}).
        """
        self._load = load
        self.label = label
        self.current: Any = usable(load() if current is None else current)

    def getContext(self) -> SSL.Context:
        context: SSL.Context = self.current.getContext()
        return context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)

    def reload(self) -> bool:
        """
        Read the certificate and key again: True when the new ones are in use.
        Unusable files (unreadable, not PEM, a key not matching the
        certificate) are refused with one log line; the old ones stay.
        """
        try:
            new = usable(self._load())
        except Exception as e:  # anything the files can throw at a parser; the old context stays
            log.error("TLS {label}: new certificate/key refused ({error}); still using {old}",
                      label=self.label, error=_error_text(e),
                      old=describe_certificate(self.current))
            return False
        self.current = new
        log.info("TLS {label}: certificate loaded: {new}", label=self.label, new=describe_certificate(new))
        return True


def _error_text(e: Exception) -> str:
    kind = type(e)
    name = kind.__name__ if kind.__module__ == "builtins" else "%s.%s" % (kind.__module__, kind.__name__)
    return "%s: %s" % (name, e)


class _CapturingReactor:
    """Takes the place of a reactor for one C{listenSSL}, only to keep its context factory."""

    def __init__(self) -> None:
        self.context_factory: Any = None

    def listenSSL(self, port: int, factory: object, contextFactory: object, backlog: int = 50,
                  interface: str = "") -> None:
        self.context_factory = contextFactory


def ssl_description_options(description: str, client_ca: str | None = None) -> Any:
    """
    The TLS options Twisted builds for the C{ssl:} endpoint string
    C{description}, its key and certificate files read now (every C{ssl:}
    option applies: C{extraCertChain}, C{dhParameters}, C{sslmethod}).
    Nothing listens.  With C{client_ca} (a PEM file of CA certificates),
    client certificates are requested (not required) and verified against it,
    as on STLS: SASL EXTERNAL on implicit TLS.

    @raise ValueError: C{description} is not an C{ssl:} endpoint.
    """
    capture = _CapturingReactor()
    endpoint = endpoints.serverFromString(capture, description)
    endpoint.listen(Factory.forProtocol(Protocol))
    if capture.context_factory is None:
        raise ValueError("not an ssl: endpoint")
    if client_ca is not None:
        request_client_certificates(capture.context_factory, client_ca)
    return capture.context_factory


def request_client_certificates(options: Any, client_ca: str) -> None:
    """
    Make C{options} (Twisted's server TLS options) ask clients for a
    certificate and verify one they send against C{client_ca}; a client
    without a certificate is still served (as C{CertificateOptions(verify=True,
    requireCertificate=False)} does).
    """
    with open(client_ca, "rb") as f:
        pem = f.read()
    cas = [crypto.load_certificate(crypto.FILETYPE_PEM, m.group(0))
           for m in re.finditer(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)]
    if not cas:
        raise ValueError("no certificate found in %s" % (client_ca,))
    context = options.getContext()
    store = context.get_cert_store()
    for ca in cas:
        store.add_cert(ca)
    context.set_verify(SSL.VERIFY_PEER, lambda connection, cert, errno, depth, ok: bool(ok))


class ReloadingTLSReactor:
    """
    The reactor as C{serverFromString(description)} sees it: C{listenSSL}
    (the C{ssl:} endpoints) listens with a L{ReloadableServerTLS} re-reading
    the files named in C{description}, handed to C{register} first.
    Everything else is C{reactor}'s (the real reactor, or another such
    wrapper, e.g. L{popservice.server.proxy.listening_reactor}).
    """

    def __init__(self, reactor: Any, description: str,
                 register: Callable[[ReloadableServerTLS], object], client_ca: str | None = None) -> None:
        self._reactor = reactor
        self._description = description
        self._register = register
        self._client_ca = client_ca

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        description, client_ca = self._description, self._client_ca
        if client_ca is not None:
            request_client_certificates(contextFactory, client_ca)
        tls = ReloadableServerTLS(lambda: ssl_description_options(description, client_ca),
                                  "listener ssl:%d" % (port,), current=contextFactory)
        self._register(tls)
        listening: IListeningPort = self._reactor.listenSSL(port, factory, tls, backlog, interface)
        return listening

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
