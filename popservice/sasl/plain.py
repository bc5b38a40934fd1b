# -*- test-case-name: tests.test_sasl_mechanisms -*-
"""
The password-in-the-exchange SASL mechanisms: PLAIN (RFC 4616) and the legacy
LOGIN (draft-murchison-sasl-login).  Both carry the password recoverably, so
their factories say C{plaintext = True}: the server offers them only over TLS
or to trusted peers.  Both end in L{PlainCredentials} that the portal's
password checker verifies (in constant time, any password scheme).

Master users
============

PLAIN carries an authorization identity (authzid) next to the authentication
identity (authcid).  An empty authzid, or one equal to the authcid, logs in as
the authcid.  A different authzid is refused unless
C{SASLContext.services["master_users"]} allows it; that service is either

  - a collection of master user names (they may log in as anyone), or
  - a callable C{rule(master: str, target: str) -> bool}.

When allowed, the mechanism builds L{MasterUserCredentials} (target, master,
password) and verifies them with L{MasterUserChecker}: it checks the rule,
verifies the I{master's} password with the portal's own password checker (so
the master's C{nologin}, scheme, failure delay ... apply as usual) and answers
the I{target} as the avatar id.  The exchange then ends in
C{Authenticated(Verified(target, "PLAIN"))}, which the portal's
L{VerifiedChecker} accepts: the session is the target's mailbox.
L{MasterUserChecker} is an ordinary cred checker and can also be put in a
portal directly (e.g. for a Dovecot-style C{USER target*master} login).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any, Union, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from popservice.auth.chain import CheckerChain
from popservice.auth.credentials import IMasterUserCredentials, MasterUserCredentials, PlainCredentials
from popservice.sasl.base import Challenge, ISASLServerMechanism, SASLContext, SASLStep, Verified
from popservice.sasl.common import ClientFirstMechanism, MechanismBase, log, password_checkers, utf8

__all__ = ["LoginMechanism", "MasterRule", "MasterUserChecker", "PlainMechanism", "master_rule"]

#: C{rule(master, target)}: may C{master} log in as C{target}?
MasterRule = Callable[[str, str], bool]


def master_rule(spec: object) -> MasterRule | None:
    """
    The master-user rule from the C{"master_users"} service: C{None} (no
    master users), a callable, or a collection of master user names.
    """
    if spec is None:
        return None
    if callable(spec):
        return cast(MasterRule, spec)
    if isinstance(spec, (str, bytes)):
        raise TypeError("master_users must be a collection of names or a callable, not a string")
    names = frozenset(cast(Iterable[str], spec))
    return lambda master, target: master in names


@implementer(ICredentialsChecker)
class MasterUserChecker:
    """
    Verifies L{IMasterUserCredentials}: the master's password through one of
    C{checkers} (the first accepting L{IUsernamePassword}), and C{rule}.
    Fires with the target user name.
    """

    credentialInterfaces = (IMasterUserCredentials,)

    def __init__(self, rule: MasterRule | Collection[str], checkers: Iterable[Any]) -> None:
        resolved = master_rule(rule)
        assert resolved is not None
        self.rule: MasterRule = resolved
        candidates = password_checkers(checkers)
        self.checker: Any = (None if not candidates else candidates[0] if len(candidates) == 1
                             else CheckerChain(candidates))

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[str]":  # type: ignore[override]
        master = utf8(bytes(credentials.master))
        target = utf8(bytes(credentials.username))
        if master is None or target is None or not master or not target or self.checker is None:
            return defer.fail(UnauthorizedLogin())
        try:
            allowed = bool(self.rule(master, target))
        except Exception:
            log.failure("master user rule failed")
            allowed = False
        # Verify the password even when the rule says no: same work, same timing.
        d: defer.Deferred[Any] = defer.maybeDeferred(
            self.checker.requestAvatarId, credentials.master_credentials())

        def decide(avatar_id: object) -> str:
            if not allowed:
                log.info("master login of {master!r} as {target!r} refused by the rule",
                         master=master, target=target)
                raise UnauthorizedLogin()
            who = avatar_id.decode("utf-8", "replace") if isinstance(avatar_id, bytes) else avatar_id
            if who != master:
                raise UnauthorizedLogin()
            log.info("master user {master!r} logs in as {target!r}", master=master, target=target)
            return target

        return d.addCallback(decide)


def _split_plain(message: bytes) -> tuple[bytes, bytes, bytes] | None:
    """RFC 4616 section 2: C{[authzid] NUL authcid NUL passwd}."""
    parts = message.split(b"\x00")
    if len(parts) != 3:
        return None
    authzid, authcid, passwd = parts
    if not authcid or not passwd or len(authcid) > 255 or len(authzid) > 255 or len(passwd) > 255:
        return None
    if utf8(authcid) is None or utf8(authzid) is None or utf8(passwd) is None:
        return None
    return authzid, authcid, passwd


@implementer(ISASLServerMechanism)
class PlainMechanism(ClientFirstMechanism):
    """PLAIN (RFC 4616): one message, C{authzid NUL authcid NUL password}."""

    name = "PLAIN"
    plaintext = True

    def respond(self, response: bytes) -> Union[SASLStep, "defer.Deferred[SASLStep]"]:
        parts = _split_plain(response)
        if parts is None:
            return self.fail("Malformed PLAIN message")
        authzid, authcid, password = parts
        if not authzid or authzid == authcid:
            return self.succeed(PlainCredentials(authcid, password))
        rule = master_rule(self.context.services.get("master_users"))
        if rule is None:
            return self.fail("Authorization identity refused")
        self.finished = True
        checker = MasterUserChecker(rule, self.context.checkers)
        d = checker.requestAvatarId(MasterUserCredentials(authzid, authcid, password))

        def done(target: str) -> SASLStep:
            return self.succeed(Verified(target, self.name))

        def failed(failure: Failure) -> SASLStep:
            failure.trap(UnauthorizedLogin)
            return self.fail()

        return d.addCallbacks(done, failed)


@implementer(ISASLServerMechanism)
class LoginMechanism(MechanismBase):
    """
    LOGIN (legacy, draft-murchison-sasl-login): the server asks C{Username:}
    then C{Password:}.  An initial response is taken as the user name (what
    Outlook and some libraries send).
    """

    name = "LOGIN"
    plaintext = True

    def __init__(self, context: SASLContext) -> None:
        super().__init__(context)
        self._username: bytes | None = None
        self._started = False

    def step(self, response: bytes | None) -> SASLStep:
        if self.finished:
            return self.wrong_state()
        if not self._started:
            self._started = True
            if not response:
                return Challenge(b"Username:")
            return self._got_username(response)
        if response is None:
            return self.wrong_state()
        if self._username is None:
            return self._got_username(response)
        if not response or utf8(response) is None or len(response) > 1024:
            return self.fail("Malformed password")
        return self.succeed(PlainCredentials(self._username, response))

    def _got_username(self, response: bytes) -> SASLStep:
        if utf8(response) is None or len(response) > 255 or not response.strip():
            return self.fail("Malformed user name")
        self._username = response
        return Challenge(b"Password:")
