"""
The Twisted engine's client TLS: the chain checked against a trust root, the
server's name checked by service_identity (RFC 6125: DNS names and IP
addresses against the subjectAltNames; the CN is never used), and any failure
of either, whatever raised it, a failed handshake.

Twisted's own C{optionsForClientTLS} is not used: its verify callback
(Twisted 26.10) turns only service_identity's C{VerificationError} into a
failed handshake; anything else the check raises (C{CertificateError} for a
certificate without subjectAltName, for one) is logged and the handshake
goes on, so a client would send its password to a server whose certificate
names no host at all.  Here the callback refuses the certificate on any
exception, and reports every refusal as a L{TLSError} with the text the
blocking engine gives for the same problem
(L{popservice.client.common.certificate_error}).

The verify callback runs while OpenSSL processes the server's certificate,
before the client's C{Finished}: nothing the application wrote (STLS: the
CAPA after it; a login) has left the client when the connection is aborted.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from popservice.client.common import TLSError, certificate_error, handshake_error, name_mismatch

__all__ = ["VerifyingClientTLS", "as_tls_error", "is_ip_literal", "tls_options"]


def is_ip_literal(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            pass
    return False


def _ascii_hostname(hostname: str) -> str:
    try:
        return hostname.encode("ascii").decode("ascii")
    except UnicodeEncodeError:
        pass
    try:
        import idna

        return str(idna.encode(hostname).decode("ascii"))
    except ImportError:  # pragma: no cover (idna comes with Twisted's TLS extra)
        return hostname.encode("idna").decode("ascii")


def _library_text(code: int) -> str:
    """OpenSSL's text for an X509_V_ERR_* code (pyOpenSSL has no public call for it)."""
    try:
        from OpenSSL._util import ffi, lib

        text: bytes = ffi.string(lib.X509_verify_cert_error_string(code))
        return text.decode("ascii", "replace")
    except Exception:
        return ""


class _Verifier:
    """
    The verify callback of one connection.  Returns C{False} (OpenSSL then
    fails the handshake) for a chain OpenSSL did not accept, for a name
    that does not match, and for any exception at all; the first refusal
    is handed to the TLS protocol as the reason the connection is lost.
    """

    def __init__(self, protocol: Any, host: str, ip: bool, service_id: Any) -> None:
        self.protocol = protocol
        self.host = host
        self.ip = ip
        self.service_id = service_id
        self.refused = False

    def __call__(self, connection: Any, cert: Any, code: int, depth: int, ok: int) -> bool:
        try:
            return self._check(cert, code, depth, ok)
        except BaseException as e:  # nothing may escape into OpenSSL, nothing unchecked may pass
            try:
                self._refuse(TLSError(f"certificate verification failed for {self.host}: {e!r}"))
            except BaseException:  # noqa: S110 (returning False fails the handshake anyway)
                pass
            return False

    def _check(self, cert: Any, code: int, depth: int, ok: int) -> bool:
        if self.refused:
            return False
        if not ok:
            self._refuse(certificate_error(self.host, code, _library_text(code), self.ip))
            return False
        if depth != 0:
            return True  # the chain: OpenSSL's; the name is the leaf's
        from service_identity import CertificateError, VerificationError
        from service_identity.cryptography import extract_patterns
        from service_identity.hazmat import verify_service_identity

        try:
            verify_service_identity(extract_patterns(cert.to_cryptography()), [self.service_id], [])
        except (VerificationError, CertificateError):
            # a name that does not match, or (CertificateError) no subjectAltName at all
            self._refuse(TLSError(f"certificate verification failed for {self.host}: "
                                  f"{name_mismatch(self.host, self.ip)}"))
            return False
        except Exception as e:
            self._refuse(TLSError(f"certificate verification failed for {self.host}: "
                                  f"cannot check the name: {e}"))
            return False
        self.protocol = None  # checked: no reference cycle through the connection
        return True

    def _refuse(self, error: TLSError) -> None:
        self.refused = True
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.failVerification(Failure(error))


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientTLS:
    """
    A client connection creator for C{hostname}: the chain verified against
    C{trust_root} (the platform's trust store when C{None}), the name by
    service_identity, SNI sent for a host name (not for an IP address).
    """

    def __init__(self, hostname: str, trust_root: Any = None) -> None:
        from service_identity.hazmat import DNS_ID, IPAddress_ID

        self.hostname = hostname
        self.ip = is_ip_literal(hostname)
        self._options = ssl.CertificateOptions(
            trustRoot=trust_root if trust_root is not None else ssl.platformTrust())
        self._sni: bytes | None
        if self.ip:
            self._sni = None
            self._service_id: Any = IPAddress_ID(hostname)
        else:
            ascii_name = _ascii_hostname(hostname)
            self._sni = ascii_name.encode("ascii")
            self._service_id = DNS_ID(ascii_name)

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._options.clientConnectionForTLS(tls_protocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        verifier = _Verifier(tls_protocol, self.hostname, self.ip, self._service_id)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verifier)
        return connection


def _pem_certificates(data: bytes) -> list[Any]:
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.DOTALL)
    if not blocks:
        raise ValueError("no PEM certificate in the CA file")
    return [ssl.Certificate.loadPEM(b) for b in blocks]


def tls_options(hostname: str, ca_file: str | None = None, insecure: bool = False) -> Any:
    """
    A client TLS connection creator for C{hostname}: verified against the
    platform trust store, or the certificates in C{ca_file} (PEM) only;
    C{insecure=True} disables verification entirely.
    """
    if insecure:
        return ssl.CertificateOptions(verify=False)
    if ca_file is not None:
        with open(ca_file, "rb") as f:
            trust = ssl.trustRootFromCertificates(_pem_certificates(f.read()))
        return VerifyingClientTLS(hostname, trust)
    return VerifyingClientTLS(hostname)


def as_tls_error(host: str, error: BaseException) -> BaseException:
    """
    An OpenSSL error from a handshake as the L{TLSError} the blocking engine
    raises for it (C{"handshake with HOST failed: wrong version number"});
    anything else unchanged.
    """
    if not isinstance(error, SSL.Error):
        return error
    reasons = []
    for item in (error.args[0] if error.args and isinstance(error.args[0], list) else []):
        if isinstance(item, tuple) and item and item[-1]:
            reasons.append(str(item[-1]))
    return handshake_error(host, "; ".join(reasons) or str(error) or type(error).__name__)
