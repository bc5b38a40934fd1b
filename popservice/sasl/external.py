# -*- test-case-name: tests.test_sasl_server -*-
"""
EXTERNAL (RFC 4422 appendix A) with a TLS client certificate.

The identity is taken from the certificate the client presented in the TLS
handshake (C{SASLContext.peer_certificate}).  B{The TLS layer must have
verified it}: the server's TLS context has to request client certificates
and check them against the configured client CA (e.g.
C{CertificateOptions(verify=True, caCerts=[ca], requireCertificate=False)});
a server that does not request certificates never receives one, so EXTERNAL
then always fails.

The mapping from certificate to user is C{SASLContext.services["external_identity"]}:

  - C{"cn"} (default): the subject's commonName;
  - C{"email"}: the first rfc822Name of the subjectAltName (else the
    subject's emailAddress);
  - C{"email-localpart"}: the same, without C{@domain};
  - a callable C{f(cert: cryptography.x509.Certificate) -> str | None}.

The client's message is the authorization identity: empty (log in as the
certificate's user) or equal to it; anything else fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID
from zope.interface import implementer

from popservice.sasl.base import ISASLServerMechanism, SASLStep, Verified
from popservice.sasl.common import ClientFirstMechanism, log, utf8

__all__ = ["ExternalMechanism", "certificate_identity", "to_cryptography"]

IdentityMap = Callable[[x509.Certificate], str | None]


def to_cryptography(certificate: Any) -> x509.Certificate | None:
    """A C{cryptography} certificate from a pyOpenSSL X509, DER bytes, or one already."""
    if certificate is None:
        return None
    if isinstance(certificate, x509.Certificate):
        return certificate
    if isinstance(certificate, bytes):
        return x509.load_der_x509_certificate(certificate)
    convert = getattr(certificate, "to_cryptography", None)
    if convert is not None:
        result = convert()
        return result if isinstance(result, x509.Certificate) else None
    # twisted.internet.ssl.Certificate wraps an X509 as .original
    original = getattr(certificate, "original", None)
    return to_cryptography(original) if original is not None else None


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else None


def _email(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        san = None
    if isinstance(san, x509.SubjectAlternativeName):
        emails = san.get_values_for_type(x509.RFC822Name)
        if emails:
            return str(emails[0])
    names = cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
    if len(names) == 1 and isinstance(names[0].value, str):
        return names[0].value
    return None


def _email_localpart(cert: x509.Certificate) -> str | None:
    email = _email(cert)
    if email is None or "@" not in email:
        return None
    return email.rpartition("@")[0]


_MAPS: dict[str, IdentityMap] = {
    "cn": _common_name,
    "email": _email,
    "email-localpart": _email_localpart,
}

#: Names accepted for the C{external_identity} service.
IDENTITY_MAPS = frozenset(_MAPS)


def certificate_identity(certificate: Any, mapping: str | IdentityMap | None = "cn") -> str | None:
    """The user name C{certificate} stands for under C{mapping}, or C{None}."""
    cert = to_cryptography(certificate)
    if cert is None:
        return None
    if mapping is None:
        mapping = "cn"
    if isinstance(mapping, str):
        if mapping not in _MAPS:
            raise ValueError("unknown external_identity %r (one of %s)" % (mapping, ", ".join(sorted(_MAPS))))
        mapper = _MAPS[mapping]
    else:
        mapper = mapping
    user = mapper(cert)
    if not user or any(ord(c) < 0x20 or c in "/\\" for c in user) or user in (".", ".."):
        return None
    return user


@implementer(ISASLServerMechanism)
class ExternalMechanism(ClientFirstMechanism):
    """EXTERNAL: the verified TLS client certificate is the credential."""

    name = "EXTERNAL"
    plaintext = False

    def respond(self, response: bytes) -> SASLStep:
        authzid = utf8(response)
        if authzid is None:
            return self.fail("Malformed authorization identity")
        if not self.context.tls or self.context.peer_certificate is None:
            return self.fail("No client certificate")
        try:
            user = certificate_identity(self.context.peer_certificate,
                                        self.context.services.get("external_identity", "cn"))
        except Exception:
            log.failure("EXTERNAL identity mapping")
            return self.fail()
        if user is None:
            return self.fail("Client certificate not mapped to a user")
        if authzid and authzid != user:
            return self.fail("Authorization identity refused")
        return self.succeed(Verified(user, self.name))
