# -*- test-case-name: tests.test_sasl_mechanisms -*-
"""
CRAM-MD5 (RFC 2195): the server sends a unique msg-id style challenge
C{<random.pid.time@hostname>}, the client answers C{user SP hex(HMAC-MD5(password,
challenge))}.  The exchange ends in L{CramMD5Credentials} that the portal's
checker verifies: L{PasswdFileChecker} accepts them for users with a PLAIN
password or a C{{CRAM-MD5}} (HMAC-MD5 context) secret, in constant time.
"""

from __future__ import annotations

from zope.interface import implementer

from popservice.auth.credentials import CramMD5Credentials
from popservice.sasl.base import Challenge, ISASLServerMechanism, SASLContext, SASLStep
from popservice.sasl.common import MechanismBase, safe_hostname, utf8

__all__ = ["CramMD5Mechanism"]


@implementer(ISASLServerMechanism)
class CramMD5Mechanism(MechanismBase):
    """CRAM-MD5 (RFC 2195); server-first, so an initial response is refused."""

    name = "CRAM-MD5"
    plaintext = False

    def __init__(self, context: SASLContext) -> None:
        super().__init__(context)
        self.credentials = CramMD5Credentials(host=safe_hostname(context.hostname))
        self._challenged = False

    def step(self, response: bytes | None) -> SASLStep:
        if self.finished:
            return self.wrong_state()
        if not self._challenged:
            if response is not None:
                # RFC 4422 section 5 (3): a server-first mechanism takes no initial response.
                return self.fail("CRAM-MD5 takes no initial response")
            self._challenged = True
            return Challenge(self.credentials.getChallenge())
        if response is None or utf8(response) is None or len(response) > 512:
            return self.fail("Malformed CRAM-MD5 response")
        try:
            self.credentials.setResponse(response)
        except ValueError:
            return self.fail("Malformed CRAM-MD5 response")
        digest = self.credentials.response
        if len(digest) != 32 or any(c not in b"0123456789abcdef" for c in digest):
            return self.fail("Malformed CRAM-MD5 response")
        return self.succeed(self.credentials)
