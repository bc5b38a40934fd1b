# -*- test-case-name: tests.test_sasl_mechanisms -*-
"""
The registry of server-side SASL mechanisms for POP3 AUTH (RFC 5034).

  - L{MECHANISMS}: every mechanism by IANA name -> its factory (the class;
    C{factory(SASLContext)} starts one exchange).
  - L{DEFAULT_MECHANISMS}: the secure default, in order of preference.
  - L{mechanisms_from_option}: C{"SCRAM-SHA-256,PLAIN,..."} -> the ordered
    dict C{ServerConfig.sasl} wants (C{ValueError} on an unknown name).
  - L{missing_services}: what a mechanism list still needs from
    C{ServerConfig.sasl_services} / the TLS setup, for start-up warnings.

C{ServerConfig.sasl_services} keys the mechanisms read:

  - C{"token_validator"}: an L{popservice.auth.tokens.ITokenValidator}
    (OAUTHBEARER, XOAUTH2);
  - C{"oauth_scope"}, C{"oauth_configuration"}: echoed in OAuth error JSON;
  - C{"master_users"}: names or C{rule(master, target)} (PLAIN authzid; see
    L{popservice.sasl.plain});
  - C{"external_identity"}: C{"cn"}, C{"email"}, C{"email-localpart"} or a
    callable (EXTERNAL);
  - C{"digest_uri_hosts"}: accepted hosts in DIGEST-MD5's digest-uri.

Secrets: SCRAM and DIGEST-MD5 read them from a portal checker providing
L{popservice.auth.credentials.ISASLSecretSource} (L{PasswdFileChecker});
PLAIN/LOGIN/CRAM-MD5 end in credentials the portal's checkers verify.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from popservice.sasl.base import MechanismFactory
from popservice.sasl.cram import CramMD5Mechanism
from popservice.sasl.digest import DigestMD5Mechanism
from popservice.sasl.external import ExternalMechanism
from popservice.sasl.oauth import OAuthBearerMechanism, XOAuth2Mechanism
from popservice.sasl.plain import LoginMechanism, PlainMechanism
from popservice.sasl.scram import ScramSHA1Mechanism, ScramSHA256Mechanism

__all__ = [
    "DEFAULT_MECHANISMS",
    "MECHANISMS",
    "CramMD5Mechanism",
    "DigestMD5Mechanism",
    "ExternalMechanism",
    "LoginMechanism",
    "OAuthBearerMechanism",
    "PlainMechanism",
    "ScramSHA1Mechanism",
    "ScramSHA256Mechanism",
    "XOAuth2Mechanism",
    "mechanisms_from_option",
    "missing_services",
]

#: Every mechanism this package implements, strongest first.
MECHANISMS: dict[str, MechanismFactory] = {
    "SCRAM-SHA-256": ScramSHA256Mechanism,
    "SCRAM-SHA-1": ScramSHA1Mechanism,
    "EXTERNAL": ExternalMechanism,
    "OAUTHBEARER": OAuthBearerMechanism,
    "XOAUTH2": XOAuth2Mechanism,
    "CRAM-MD5": CramMD5Mechanism,
    "DIGEST-MD5": DigestMD5Mechanism,
    "PLAIN": PlainMechanism,
    "LOGIN": LoginMechanism,
}

#: The default AUTH offer.  DIGEST-MD5 (historic, RFC 6331) is never on by
#: default; EXTERNAL and the OAuth mechanisms need configuration (a client CA,
#: a token validator).  SCRAM and CRAM-MD5 work for users whose secrets allow
#: them (SCRAM keys or PLAIN, CRAM-MD5 context or PLAIN); with a passwd-file of
#: only one-way hashes (ARGON2ID ...) offer "PLAIN,LOGIN" instead, since a
#: client that picks SCRAM cannot fall back (see L{mechanisms_for_checker}).
DEFAULT_MECHANISMS = "SCRAM-SHA-256,SCRAM-SHA-1,CRAM-MD5,PLAIN,LOGIN"


def mechanisms_from_option(text: str) -> dict[str, MechanismFactory]:
    """
    Parse a mechanism list such as C{"SCRAM-SHA-256, PLAIN LOGIN"} (comma
    and/or space separated, case-insensitive) into an ordered name -> factory
    dict.  An empty string or C{"none"} gives no mechanisms.

    @raise ValueError: on an unknown or repeated name (the message lists the
        known ones).
    """
    names = [n.strip().upper() for n in text.replace(",", " ").split()]
    if names == ["NONE"]:
        return {}
    result: dict[str, MechanismFactory] = {}
    for name in names:
        if name not in MECHANISMS:
            raise ValueError("unknown SASL mechanism %r; known: %s" % (name, ", ".join(MECHANISMS)))
        if name in result:
            raise ValueError("SASL mechanism %r listed twice" % (name,))
        result[name] = MECHANISMS[name]
    return result


def missing_services(mechanisms: Mapping[str, Any], services: Mapping[str, Any], *,
                     client_ca: bool = True) -> list[str]:
    """
    Human-readable problems with C{mechanisms} under C{services}: OAuth
    without a C{token_validator}, EXTERNAL without client-certificate
    verification (C{client_ca=False}).  Empty when all is well.
    """
    problems = []
    for name in ("OAUTHBEARER", "XOAUTH2"):
        if name in mechanisms and services.get("token_validator") is None:
            problems.append("%s needs a token validator (sasl_services['token_validator'])" % (name,))
    if "EXTERNAL" in mechanisms and not client_ca:
        problems.append("EXTERNAL needs TLS client certificates verified against a client CA")
    identity = services.get("external_identity")
    if "EXTERNAL" in mechanisms and isinstance(identity, str):
        from popservice.sasl.external import IDENTITY_MAPS

        if identity not in IDENTITY_MAPS:
            problems.append("unknown external_identity %r (one of %s)"
                            % (identity, ", ".join(sorted(IDENTITY_MAPS))))
    return problems


def mechanisms_for_checker(checker: Any, base: str = DEFAULT_MECHANISMS) -> str:
    """
    C{base} without the mechanisms some users of C{checker} (a
    L{PasswdFileChecker}) could not use: SCRAM-SHA-* unless every user has
    SCRAM keys of that hash or a PLAIN password, CRAM-MD5 unless every user
    has a PLAIN or CRAM-MD5 secret, DIGEST-MD5 unless every user has a PLAIN
    password.  A client that picks SCRAM from CAPA cannot fall back to
    another mechanism on failure, so offer only what works for everyone.
    """
    from popservice.auth.passwdfile import SCRAM_EXTRA_FIELDS

    records = list(checker.records())
    usable = [r for r in records if r.scheme is not None]

    def works(name: str) -> bool:
        if name in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
            return all(r.recoverable or r.scheme == name or SCRAM_EXTRA_FIELDS[name] in r.extra
                       for r in usable)
        if name == "CRAM-MD5":
            return all(r.recoverable or r.scheme == "CRAM-MD5" for r in usable)
        if name == "DIGEST-MD5":
            return all(r.recoverable for r in usable)
        return True

    return ",".join(n for n in mechanisms_from_option(base) if works(n))
