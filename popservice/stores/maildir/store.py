"""
The Maildir mail store (L{IMailStore}): Maildir path templates (C{%u},
C{~} for the home directory, C{%%}), the strict check of a user name before
it is put into a path, the session lock (an exclusive C{flock} on
C{popservice.lock}, see L{popservice.stores.lock}) and opening a mailbox
(create the Maildir, lock it, scan it).  Delivery (L{IMailDelivery}) is in
L{popservice.stores.maildir.delivery}; it never takes the session lock.

Mail is read and written only below the I{mail root}: the template's fixed
part before C{%u} (C{/srv/mail} for C{/srv/mail/%u}), or the user's home for
a C{~} template.  A Maildir that a symbolic link leads out of it is refused
with L{MailboxForbidden} (unless C{allow_symlinks}), and so is a Maildir
owned by another uid than the one C{owner_of} gives for its user (the
passwd-file's uid field), when it gives one.

A warm login does all of it on the reactor thread, with four C{stat} calls
and the lock: the store keeps the last listing of each Maildir
(L{WarmListings}), stamped with the Maildir's identity when it passed the
mail-root check and with the state of C{cur/}, C{new/} and the index it was
made from (L{popservice.stores.maildir.freshness}).  The same Maildir
inode needs no new root check before its lock file is opened (no symbolic
link can have been put in place of it); the same C{cur/} and C{new/}
inodes (C{lstat}: a symbolic link there is another inode) and index need
neither a check nor a scan.  Anything else (a delivery, a removal, a
flag changed by another client, a directory changed too recently to be
sure) goes to the thread pool as before.
"""

from __future__ import annotations

import os
import pwd
import re
import sys
import unicodedata
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from popservice.interfaces import (
    IMailbox,
    IMailboxLock,
    IMailDelivery,
    IMailStore,
    MailboxForbidden,
    MailboxUnavailable,
    NoSuchMailbox,
)
from popservice.stores.lock import LOCK_FILE_NAME, FcntlMailboxLock
from popservice.stores.maildir.cache import WarmListings
from popservice.stores.maildir.delivery import deliver_into, maildir_exists
from popservice.stores.maildir.freshness import identity, stamp, warm_state
from popservice.stores.maildir.importers import DEFAULT_DOVECOT_UIDL_FORMAT, DovecotUIDLFormat
from popservice.stores.maildir.layout import ensure_maildir, outside_root
from popservice.stores.maildir.listing import Listing
from popservice.stores.maildir.mailbox import MaildirMailbox, _translate
from popservice.stores.maildir.scan import scan_maildir
from popservice.stores.maildir.work import maildir_pool

__all__ = ["MaildirStore", "expected_uid", "valid_user_name"]

log = Logger(namespace="popservice.stores.maildir")

_PUNCTUATION = frozenset("._@+-")


def valid_user_name(user: str) -> bool:
    """
    May C{user} be substituted into a path?  Letters and digits of any script
    (RFC 6856 UTF-8 user names, in NFC) and C{._@+-}; starting with a letter
    or digit (so never C{.} or C{..}), no C{..} anywhere, at most 64
    characters and 255 octets; never C{/}, NUL, spaces or control characters.
    """
    if not user or len(user) > 64 or not user[0].isalnum() or ".." in user:
        return False
    if not all(c.isalnum() or c in _PUNCTUATION for c in user):
        return False
    try:
        if len(user.encode("utf-8")) > 255:
            return False
    except UnicodeEncodeError:  # lone surrogates from undecodable bytes
        return False
    return unicodedata.normalize("NFC", user) == user


@implementer(IMailStore, IMailDelivery)
class MaildirStore:
    """
    Maildirs located by a template: C{/srv/mail/%u}, C{~/Maildir} (C{~} is the
    C{home} given to L{open_mailbox}), C{%%} for a literal C{%}.

    @param lock_policy: C{"exclusive"} (an L{FcntlMailboxLock} on
        C{popservice.lock} in the Maildir for the whole session) or C{"none"}.
    @param dovecot_uidl_format: Dovecot's C{pop3_uidl_format} of the server
        being replaced, used to take its UIDLs over from C{dovecot-uidlist}.
    @param lock_factory: makes the session lock from the Maildir path when
        C{lock_policy} is C{"exclusive"} (default: L{FcntlMailboxLock} on
        C{<maildir>/popservice.lock}).
    @param allow_symlinks: open a Maildir even when a symbolic link leads it
        (or its cur/new/tmp) out of the mail root (L{mail_root}).
    @param owner_of: the uid (a number or a user name, as the passwd-file's
        uid field) a user's Maildir must belong to, or C{None} (any owner).
    """

    def __init__(
        self,
        template: str,
        *,
        lock_policy: str = "exclusive",
        dovecot_uidl_format: str = DEFAULT_DOVECOT_UIDL_FORMAT,
        lock_factory: Callable[[str], IMailboxLock] | None = None,
        allow_symlinks: bool = False,
        owner_of: Callable[[str], str | None] | None = None,
    ) -> None:
        if lock_policy not in ("exclusive", "none"):
            raise ValueError(f"lock_policy must be 'exclusive' or 'none', not {lock_policy!r}")
        self._check_template(template)
        self.template = template
        self.lock_policy = lock_policy
        self.uidl_format = DovecotUIDLFormat(dovecot_uidl_format)
        self._lock_factory = lock_factory
        self.allow_symlinks = allow_symlinks
        self.owner_of = owner_of
        #: the last listing of each Maildir opened, for warm logins
        self.listings = WarmListings()

    @classmethod
    def from_description(cls, description: str, **kwargs: object) -> "MaildirStore":
        """
        A store from a C{maildir:<template>} description, e.g.
        C{maildir:/srv/mail/%u} or C{maildir:~/Maildir}.  Keyword arguments
        are passed to the constructor.
        """
        kind, sep, template = description.partition(":")
        if not sep or kind != "maildir":
            raise ValueError(
                "mail store description must look like 'maildir:/srv/mail/%u' or "
                f"'maildir:~/Maildir', not {description!r}")
        if ":" in template:
            raise ValueError(f"maildir options (':KEY=value') are not supported in {description!r}")
        return cls(template, **kwargs)  # type: ignore[arg-type]

    @staticmethod
    def _check_template(template: str) -> None:
        if not template or "\x00" in template:
            raise ValueError("empty or invalid Maildir template")
        if not (template.startswith("/") or template == "~" or template.startswith("~/")):
            raise ValueError(f"Maildir template must be absolute or start with '~/': {template!r}")
        rest = re.sub(r"%[%u]", "", template)
        if "%" in rest:
            raise ValueError(f"Maildir template supports only %u and %%: {template!r}")

    def maildir_path(self, user: str, home: str | None) -> str:
        """The Maildir of C{user}; L{MailboxUnavailable} when it cannot be formed safely."""
        template = self.template
        if "%u" in template.replace("%%", "") and not valid_user_name(user):
            log.warn("refusing to form a Maildir path from user name {user!r}", user=user[:80])
            raise MailboxUnavailable("invalid user name for a mailbox path")
        out = []
        i = 0
        while i < len(template):
            c = template[i]
            if c == "%" and template[i + 1:i + 2] == "u":
                out.append(user)
                i += 2
            elif c == "%" and template[i + 1:i + 2] == "%":
                out.append("%")
                i += 2
            else:
                out.append(c)
                i += 1
        path = "".join(out)
        if template.startswith("~"):
            if not home or "\x00" in home or not os.path.isabs(home):
                raise MailboxUnavailable("no home directory for a '~' Maildir template")
            path = home.rstrip("/") + path[1:] if home != "/" else path[1:] or "/"
        return path

    def mail_root(self, user: str, home: str | None) -> str:
        """
        The directory C{user}'s Maildir must stay in: the template's fixed
        part before C{%u} (its directory when that part ends inside a name),
        the home for a C{~} template, the Maildir itself for a template
        without C{%u}.  L{MailboxUnavailable} when it cannot be formed.
        """
        if self.template.startswith("~"):
            if not home or "\x00" in home or not os.path.isabs(home):
                raise MailboxUnavailable("no home directory for a '~' Maildir template")
            return home.rstrip("/") or "/"
        cut = self.template.replace("%%", "\x00\x00").find("%u")
        if cut < 0:
            return self.maildir_path(user, home)
        prefix = self.template[:cut].replace("%%", "%")
        root = prefix if prefix.endswith("/") else os.path.dirname(prefix)
        return root.rstrip("/") or "/"

    def _check_root(self, user: str, home: str | None, path: str) -> None:
        """L{MailboxForbidden} when a symbolic link leads the Maildir out of the mail root."""
        if self.allow_symlinks:
            return
        root = self.mail_root(user, home)
        escape = outside_root(path, root)
        if escape is not None:
            raise MailboxForbidden(
                "%s leads to %s, outside the mail root %s (a symbolic link; --allow-mail-symlinks "
                "allows it)" % (escape[0], escape[1], root))

    def _check_owner(self, user: str, path: str, owner: int | None = None) -> None:
        """
        L{MailboxForbidden} when the Maildir belongs to another uid than
        C{owner_of(user)}; C{owner} is its uid when known (else looked up).
        """
        if self.owner_of is None:
            return
        field = self.owner_of(user)
        if not field:
            return
        expected = expected_uid(field)
        if expected is None:
            raise MailboxForbidden("the uid %r given for %s is no known user" % (field, user))
        if owner is None:
            try:
                owner = os.stat(path).st_uid
            except OSError as e:
                raise MailboxUnavailable("cannot look at Maildir %s: %s" % (path, e)) from e
        if owner != expected:
            raise MailboxForbidden(
                "Maildir %s belongs to uid %d, not to uid %d of %s in the passwd-file "
                "(--ignore-mail-owner allows it)" % (path, owner, expected, user))

    def _make_lock(self, path: str, user: str = "") -> IMailboxLock | None:
        if self.lock_policy == "none":
            return None
        if self._lock_factory is not None:
            return self._lock_factory(path)
        # The lock file records its holder (process, control socket, user) for take-over requests.
        # (interned: the session's shell holds the same name, one string for both)
        return FcntlMailboxLock(path, user=sys.intern(user) if user else None, name=LOCK_FILE_NAME)

    def open_mailbox(self, user: str, home: "str | None") -> "defer.Deferred[IMailbox]":
        """
        Deferred firing with the locked, scanned L{MaildirMailbox} of C{user};
        failing with L{MailboxInUse} or L{MailboxUnavailable} only
        (L{MailboxForbidden}: outside the mail root, or another owner's).
        Already fired when the Maildir is as its last listing found it.
        """
        try:
            path = self.maildir_path(user, home)
            ident = identity(path)
            known = self.listings.get(path)
            cached: Listing | None = None
            if known is not None:
                path, cached = known  # one path string per Maildir, shared
                state = cached.state
                if state is None or ident is None or not state.startswith(ident[0]):
                    cached = None
            if cached is None:
                self._check_root(user, home, path)
            # else the same Maildir inode as when the check last passed: no symbolic link can have
            # been put in its place, and its lock file is opened without following one
        except MailboxUnavailable as e:
            return defer.fail(e)
        return defer.Deferred.fromCoroutine(self._open(path, user, home, ident, cached))

    async def _open(self, path: str, user: str = "", home: str | None = None,
                    ident: tuple[bytes, int] | None = None, cached: Listing | None = None) -> IMailbox:
        """
        Lock and list the Maildir C{path} whose L{identity} was C{ident}
        before the mail-root check (C{cached}: a listing made when it had that
        identity; that check was skipped).
        """
        lock = self._make_lock(path, user)
        try:
            if cached is None:
                await self._ensure(path)
            self._check_owner(user, path, ident[1] if ident is not None else None)
            if lock is not None:
                await defer.maybeDeferred(lock.acquire)
            # (under the lock: another session's UPDATE is over when it is ours)
            if cached is not None and ident is not None and warm_state(path, ident[0]) == cached.state:
                listing = cached
            else:
                if cached is not None:
                    # cur/ or new/ changed: they could be symbolic links now
                    self._check_root(user, home, path)
                    await self._ensure(path)
                listing = await maildir_pool.run(scan_maildir, path, self.uidl_format)
                # with the identity the root check (this one or the last) passed, for the next login
                state = listing.state
                listing.state = None if state is None or ident is None else stamp(ident[0], state)
                self.listings.put(path, listing)
        except Exception as e:
            # CancelledError (the client went away) passes unchanged and unlogged
            error = e if isinstance(e, defer.CancelledError) else _translate(e, f"opening Maildir {path}")
            if lock is not None:
                try:
                    await defer.maybeDeferred(lock.release)
                except Exception:
                    log.failure("releasing the lock of {path} after a failed open", path=path)
            if error is e:
                raise
            raise error from e
        return MaildirMailbox(path, listing, lock)

    @staticmethod
    async def _ensure(path: str) -> None:
        """Make the Maildir's missing parts (in a thread; usually there: three stats here)."""
        if not all(os.path.isdir(os.path.join(path, sub)) for sub in ("cur", "new", "tmp")):
            await maildir_pool.run(ensure_maildir, path)

    # -- IMailDelivery -------------------------------------------------------

    def exists(self, user: str, home: "str | None") -> "defer.Deferred[bool]":
        """
        Whether C{user} has a Maildir here: it exists, or (a C{~} template) the
        home directory it would be made in exists.  A Maildir is made by
        C{popservice passwd add --maildir}, the user's first login or a
        delivery.  Fails with L{MailboxUnavailable} when the disk cannot tell now.
        """
        try:
            path = self.maildir_path(user, home)
        except MailboxUnavailable:
            return defer.succeed(False)
        home_dir = home if self.template.startswith("~") else None
        return maildir_pool.run(maildir_exists, path, home_dir)

    def deliver(self, user: str, home: "str | None", message: bytes,
                key: "str | None") -> "defer.Deferred[bool]":
        """
        Store C{message} in the Maildir of C{user} (made when missing); C{False}
        when C{key} was delivered there before.  See L{popservice.stores.maildir.delivery}.
        """
        try:
            path = self.maildir_path(user, home)
        except MailboxUnavailable as e:
            return defer.fail(NoSuchMailbox(str(e)))
        try:
            self._check_root(user, home, path)
        except MailboxUnavailable as e:
            return defer.fail(e)
        if self.owner_of is None:
            return maildir_pool.run(deliver_into, path, message, key)
        return maildir_pool.run(self._deliver_owned, user, path, message, key)

    def _deliver_owned(self, user: str, path: str, message: bytes, key: str | None) -> bool:
        if os.path.isdir(path):
            self._check_owner(user, path)
        return deliver_into(path, message, key)


def expected_uid(field: str) -> int | None:
    """A passwd-file uid field (a number or a user name) as a uid; C{None} for an unknown name."""
    if field.isdigit():
        return int(field)
    try:
        return pwd.getpwnam(field).pw_uid
    except KeyError:
        return None
