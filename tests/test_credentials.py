"""Tests for popservice.auth.credentials: APOP, CRAM-MD5, HMAC-MD5 contexts."""

from __future__ import annotations

import hashlib
import hmac
import random

from twisted.cred.credentials import IUsernameHashedPassword
from twisted.trial import unittest

from popservice.auth.credentials import (
    APOPCredentials,
    CramMD5Credentials,
    IHMACMD5ContextCredentials,
    hmac_md5_context,
    hmac_md5_from_context,
)

# Generated with `doveadm pw -s CRAM-MD5 -p ...` (Dovecot 2.3.19.1).
DOVECOT_CRAM_MD5 = [
    (b"secret", "cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56"),
    (b"", "00747cf2ffaf11c5ea4a64979c3901fc1d20dee13f480bb598f7d8575b23e61b"),
    (b"x" * 100, "52197db948d0932512a61b183e7d05b04e94d60a3bb0d00f92d3df52a5d275ca"),
]


class HMACMD5ContextTests(unittest.TestCase):
    def test_dovecot_vectors(self) -> None:
        for key, expected in DOVECOT_CRAM_MD5:
            self.assertEqual(hmac_md5_context(key).hex(), expected, key)

    def test_str_key_is_utf8(self) -> None:
        self.assertEqual(hmac_md5_context("sécret"), hmac_md5_context("sécret".encode()))

    def test_completes_to_stdlib_hmac(self) -> None:
        rng = random.Random(1234)
        for key_len in (0, 1, 16, 63, 64, 65, 200):
            for msg_len in (0, 1, 55, 56, 63, 64, 65, 119, 120, 300):
                key = rng.randbytes(key_len)
                msg = rng.randbytes(msg_len)
                self.assertEqual(
                    hmac_md5_from_context(hmac_md5_context(key), msg),
                    hmac.new(key, msg, "md5").digest(),
                    (key_len, msg_len),
                )

    def test_bad_context_length(self) -> None:
        self.assertRaises(ValueError, hmac_md5_from_context, b"x" * 31, b"msg")


class APOPCredentialsTests(unittest.TestCase):
    magic = b"<1896.697170952@dbc.mtview.ca.us>"

    def test_rfc1939_example(self) -> None:
        creds = APOPCredentials(self.magic, b"mrose", b"c4c9334bac560ecc979e58001b3e22fb")
        self.assertTrue(IUsernameHashedPassword.providedBy(creds))
        self.assertTrue(creds.checkPassword(b"tanstaaf"))
        self.assertTrue(creds.checkPassword("tanstaaf"))
        self.assertFalse(creds.checkPassword(b"tanstaaF"))
        self.assertFalse(creds.checkPassword(b""))

    def test_uppercase_digest_accepted(self) -> None:
        creds = APOPCredentials(self.magic, b"mrose", b"C4C9334BAC560ECC979E58001B3E22FB")
        self.assertTrue(creds.checkPassword(b"tanstaaf"))

    def test_garbage_digest(self) -> None:
        for digest in (b"", b"zz", b"c4c9334bac560ecc979e58001b3e22f", "\u00e9".encode()):
            self.assertFalse(APOPCredentials(self.magic, b"mrose", digest).checkPassword(b"tanstaaf"))

    def test_uses_compare_digest(self) -> None:
        calls: list[tuple[object, object]] = []
        real = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", spy)
        APOPCredentials(self.magic, b"mrose", b"c4c9334bac560ecc979e58001b3e22fb").checkPassword(b"x")
        self.assertEqual(len(calls), 1)

    def test_repr_hides_digest(self) -> None:
        self.assertNotIn("c4c9", repr(APOPCredentials(self.magic, b"mrose", b"c4c9334bac")))


class CramMD5CredentialsTests(unittest.TestCase):
    def respond(self, creds: CramMD5Credentials, user: bytes, password: bytes) -> None:
        digest = hmac.new(password, creds.getChallenge(), hashlib.md5).hexdigest().encode()
        creds.setResponse(user + b" " + digest)

    def test_rfc2195_example(self) -> None:
        creds = CramMD5Credentials(challenge=b"<1896.697170952@postoffice.reston.mci.net>")
        creds.setResponse(b"tim b913a602c7eda7a495b4e6e7334d3890")
        self.assertEqual(creds.username, b"tim")
        self.assertTrue(creds.checkPassword(b"tanstaaftanstaaf"))
        self.assertFalse(creds.checkPassword(b"tanstaaftanstaaF"))
        self.assertTrue(creds.checkHMACMD5Context(hmac_md5_context(b"tanstaaftanstaaf")))
        self.assertFalse(creds.checkHMACMD5Context(hmac_md5_context(b"wrong")))

    def test_interfaces(self) -> None:
        creds = CramMD5Credentials(b"host")
        self.assertTrue(IUsernameHashedPassword.providedBy(creds))
        self.assertTrue(IHMACMD5ContextCredentials.providedBy(creds))
        self.assertFalse(creds.moreChallenges())

    def test_challenge_unique_and_stable(self) -> None:
        a, b = CramMD5Credentials(b"pop.example"), CramMD5Credentials("pop.example")
        self.assertEqual(a.getChallenge(), a.getChallenge())
        self.assertNotEqual(a.getChallenge(), b.getChallenge())
        self.assertTrue(a.getChallenge().startswith(b"<"))
        self.assertTrue(a.getChallenge().endswith(b"@pop.example>"))

    def test_round_trip(self) -> None:
        creds = CramMD5Credentials(b"h")
        self.respond(creds, b"user name", b"pw")
        self.assertEqual(creds.username, b"user name")
        self.assertTrue(creds.checkPassword("pw"))
        self.assertFalse(creds.checkPassword("pW"))

    def test_uppercase_hex_response(self) -> None:
        creds = CramMD5Credentials(challenge=b"<1896.697170952@postoffice.reston.mci.net>")
        creds.setResponse(b"tim B913A602C7EDA7A495B4E6E7334D3890")
        self.assertTrue(creds.checkPassword(b"tanstaaftanstaaf"))

    def test_bad_response(self) -> None:
        creds = CramMD5Credentials(b"h")
        for bad in (b"", b"nospace", b" digest", b"user "):
            self.assertRaises(ValueError, creds.setResponse, bad)
        self.assertFalse(creds.checkPassword(b""))
