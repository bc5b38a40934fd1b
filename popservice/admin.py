# -*- test-case-name: tests.test_admin -*-
"""
C{popservice passwd}: manage users in a Dovecot-style passwd-file.

    popservice passwd add USER --file PASSWD [--scheme SCHEME] [--scram]
                               [--maildir TEMPLATE] [--password-stdin]
    popservice passwd change USER --file PASSWD [--scheme SCHEME] [--scram | --no-scram]
                               [--password-stdin]
    popservice passwd remove USER --file PASSWD

The password is read from the terminal without echo (twice, to confirm) or,
with C{--password-stdin}, as the first line of standard input.  It is never
printed or logged.

The file is rewritten atomically: a temporary file in the same directory,
mode 0600 (owner and group kept when running as root), C{fsync}, C{rename},
C{fsync} of the directory; an exclusive C{flock} on C{PASSWD.lock} serialises
concurrent edits.  Comments, blank lines and other users' lines are kept
byte for byte.

Schemes (C{--scheme}, default ARGON2ID): ARGON2ID, BLF-CRYPT, SHA512-CRYPT,
SSHA512, PLAIN, CRAM-MD5, SCRAM-SHA-256.  USER/PASS and SASL PLAIN/LOGIN work
with every scheme; APOP, CRAM-MD5 and DIGEST-MD5 need PLAIN (CRAM-MD5 also
works with the CRAM-MD5 scheme); SCRAM needs PLAIN, the SCRAM-SHA-256 scheme,
or C{--scram}.

SCRAM secrets with another scheme (C{--scram})
==============================================

Dovecot's C{{SCRAM-SHA-256}iter,salt,storedkey,serverkey} is a I{password
scheme}: it fills the one password field.  To keep a slow one-way hash
(ARGON2ID) for USER/PASS I{and} let SCRAM work without storing the password,
C{--scram} adds the SCRAM verification data as extra fields (field 8 of the
line)::

    alice:{ARGON2ID}$argon2id$...::::::scram_sha256=4096,SALT,STOREDKEY,SERVERKEY scram_sha1=4096,...

(same C{iterations,salt,stored_key,server_key} base64 format as Dovecot's
scheme).  L{popservice.auth.passwdfile.PasswdFileChecker.scram_secret} reads
them; Dovecot ignores unknown extra fields.  C{change} refreshes these fields
when the entry had them (or with C{--scram}) and drops them with
C{--no-scram}, so an old password never keeps working through SCRAM.

Maildirs (C{--maildir TEMPLATE})
================================

C{add --maildir /srv/mail/%u} creates the user's Maildir (C{cur}, C{new},
C{tmp}, mode 0700; missing parents 0700 as well).  C{%u} is the user name,
C{%n} its local part, C{%d} its domain (after C{@}), C{%%} a percent sign.
User names are validated first: no C{/}, no C{..}, no leading dot, no
control characters, no C{:} or white space (which would also break the
passwd-file).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from popservice.auth.passwdfile import (
    SCRAM_EXTRA_FIELDS,
    UnknownSchemeError,
    hash_password,
    scram_extra_fields,
)

__all__ = [
    "SCHEMES",
    "AdminError",
    "add_subcommands",
    "add_user",
    "change_user",
    "expand_maildir",
    "make_maildir",
    "remove_user",
    "validate_user",
]

#: Schemes C{--scheme} offers.
SCHEMES = ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SSHA512", "PLAIN", "CRAM-MD5", "SCRAM-SHA-256")

_SCRAM_KEYS = frozenset(SCRAM_EXTRA_FIELDS.values())


class AdminError(Exception):
    """A user-facing error (exit status 1); the message never holds a password."""


# ---------------------------------------------------------------------------
# Validation and Maildirs
# ---------------------------------------------------------------------------


def validate_user(user: str) -> str:
    """
    C{user} if it is safe both in a passwd-file and as a path component.

    @raise AdminError: otherwise.
    """
    if not user:
        raise AdminError("empty user name")
    if len(user.encode("utf-8", "surrogateescape")) > 255:
        raise AdminError("user name too long")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c.isspace() for c in user):
        raise AdminError("user name contains white space or control characters")
    if ":" in user or "/" in user or "\\" in user or "%" in user:
        raise AdminError("user name contains ':', '/', '\\' or '%'")
    if user.startswith((".", "-", "#")) or ".." in user:
        raise AdminError("user name starts with '.', '-' or '#', or contains '..'")
    try:
        user.encode("utf-8")
    except UnicodeEncodeError:
        raise AdminError("user name is not valid UTF-8")
    return user


def expand_maildir(template: str, user: str) -> str:
    """Expand C{%u}, C{%n}, C{%d} and C{%%} in C{template} for a validated C{user}."""
    validate_user(user)
    local, _, domain = user.partition("@")
    values = {"u": user, "n": local, "d": domain, "%": "%"}
    out = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "%":
            key = template[i + 1 : i + 2]
            if key not in values:
                raise AdminError("unknown %%-variable %r in the Maildir template (use %%u, %%n, %%d)"
                                 % ("%" + key,))
            if key == "d" and not domain:
                raise AdminError("%d in the Maildir template but the user name has no @domain")
            out.append(values[key])
            i += 2
        else:
            out.append(c)
            i += 1
    path = "".join(out)
    if "%u" not in template and "%n" not in template:
        raise AdminError("the Maildir template must contain %u or %n")
    return path


def make_maildir(path: str) -> bool:
    """Create a Maildir (cur/new/tmp, 0700) at C{path}; C{False} if it already existed."""
    existed = all(os.path.isdir(os.path.join(path, sub)) for sub in ("cur", "new", "tmp"))
    os.makedirs(path, mode=0o700, exist_ok=True)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
    return not existed


# ---------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------


def _user_of(line: bytes) -> bytes | None:
    stripped = line.rstrip(b"\r\n")
    if not stripped.strip() or stripped.lstrip().startswith(b"#") or b":" not in stripped:
        return None
    return stripped.split(b":", 1)[0]


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_lines(path: str, must_exist: bool) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read().splitlines(keepends=True)
    except FileNotFoundError:
        if must_exist:
            raise AdminError(f"{path}: no such file")
        return []


def write_atomically(path: str, data: bytes) -> None:
    """Replace C{path} with C{data}: temp file (0600) + fsync + rename + directory fsync."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        if st is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _entry_fields(line: bytes) -> list[str]:
    text = line.rstrip(b"\r\n").decode("utf-8")
    fields = text.split(":", 7)
    return fields + [""] * (8 - len(fields)) if len(fields) < 8 else fields


def _format_entry(fields: list[str]) -> bytes:
    """C{user:password:uid:gid:gecos:home:shell[:extra]}, the extra field only when set."""
    fields = list(fields) + [""] * (8 - len(fields))
    if not fields[7]:
        fields = fields[:7]
    return (":".join(fields) + "\n").encode("utf-8")


def _stored(password: str, scheme: str, scram: bool) -> tuple[str, str]:
    """(password field, SCRAM extra fields or "")."""
    if not password:
        raise AdminError("empty password")
    if any(c in "\r\n\x00" for c in password):
        raise AdminError("the password contains a line break or NUL")
    try:
        field = hash_password(password, scheme)
    except UnknownSchemeError:
        raise AdminError(f"unknown scheme {scheme!r}")
    return field, scram_extra_fields(password) if scram else ""


def _with_scram(extra: str, scram_fields: str) -> str:
    kept = [t for t in extra.split() if t.partition("=")[0] not in _SCRAM_KEYS]
    return " ".join(kept + ([scram_fields] if scram_fields else []))


def add_user(path: str, user: str, password: str, scheme: str = "ARGON2ID", scram: bool = False) -> None:
    """Append C{user}; L{AdminError} if present already."""
    validate_user(user)
    field, scram_fields = _stored(password, scheme, scram)
    with _locked(path):
        lines = _read_lines(path, must_exist=False)
        if any(_user_of(line) == user.encode("utf-8") for line in lines):
            raise AdminError(f"user {user!r} already exists in {path}")
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        fields = [user, field, "", "", "", "", "", scram_fields]
        lines.append(_format_entry(fields))
        write_atomically(path, b"".join(lines))


def change_user(path: str, user: str, password: str, scheme: str = "ARGON2ID",
                scram: bool | None = None) -> None:
    """
    Set C{user}'s password, keeping its other fields.  SCRAM extra fields are
    regenerated when C{scram} is true or (C{None}) when the entry had them,
    and dropped when C{scram} is false.
    """
    validate_user(user)
    with _locked(path):
        lines = _read_lines(path, must_exist=True)
        indexes = [i for i, line in enumerate(lines) if _user_of(line) == user.encode("utf-8")]
        if not indexes:
            raise AdminError(f"no user {user!r} in {path}")
        try:
            fields = _entry_fields(lines[indexes[0]])
        except UnicodeDecodeError:
            raise AdminError(f"the entry of {user!r} is not UTF-8")
        had_scram = any(t.partition("=")[0] in _SCRAM_KEYS for t in fields[7].split())
        field, scram_fields = _stored(password, scheme, had_scram if scram is None else scram)
        fields[1] = field
        fields[7] = _with_scram(fields[7], scram_fields)
        lines[indexes[0]] = _format_entry(fields)
        # Later duplicates are ignored by readers (the first entry wins): drop them.
        for i in reversed(indexes[1:]):
            del lines[i]
        write_atomically(path, b"".join(lines))


def remove_user(path: str, user: str) -> int:
    """Remove every entry of C{user}; the number removed (L{AdminError} if none)."""
    validate_user(user)
    with _locked(path):
        lines = _read_lines(path, must_exist=True)
        kept = [line for line in lines if _user_of(line) != user.encode("utf-8")]
        removed = len(lines) - len(kept)
        if not removed:
            raise AdminError(f"no user {user!r} in {path}")
        write_atomically(path, b"".join(kept))
        return removed


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def read_password(args: argparse.Namespace, stdin: IO[str] | None = None) -> str:
    """The new password: a line of stdin (C{--password-stdin}) or twice from the terminal."""
    if args.password_stdin:
        line = (stdin or sys.stdin).readline()
        return line[:-1] if line.endswith("\n") else line
    try:
        first = getpass.getpass(f"New password for {args.user}: ")
        second = getpass.getpass("Repeat it: ")
    except EOFError:
        raise AdminError("no password given (use --password-stdin to read it from a pipe)")
    if first != second:
        raise AdminError("the passwords do not match")
    return first


def _run(args: argparse.Namespace) -> int:
    try:
        if args.action == "remove":
            remove_user(args.file, args.user)
            print(f"removed {args.user} from {args.file}")
            return 0
        validate_user(args.user)
        maildir = None
        if getattr(args, "maildir", None):
            maildir = expand_maildir(args.maildir, args.user)
        password = read_password(args)
        if args.action == "add":
            add_user(args.file, args.user, password, args.scheme, args.scram)
            print(f"added {args.user} to {args.file} ({args.scheme}{', SCRAM keys' if args.scram else ''})")
            if maildir is not None:
                created = make_maildir(maildir)
                print(f"{'created' if created else 'kept existing'} Maildir {maildir}")
        else:
            change_user(args.file, args.user, password, args.scheme, args.scram)
            print(f"changed the password of {args.user} in {args.file} ({args.scheme})")
        return 0
    except AdminError as e:
        print(f"popservice passwd: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"popservice passwd: {e.filename or args.file}: {e.strerror or e}", file=sys.stderr)
        return 1


def add_subcommands(subparsers: Any) -> None:
    """Add C{passwd} to the C{popservice} command's subparsers."""
    passwd = subparsers.add_parser("passwd", help="add, change or remove users in a passwd-file",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)
    actions = passwd.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("user", metavar="USER")
        p.add_argument("--file", "-f", required=True, metavar="PASSWD", help="the passwd-file")

    def secret(p: argparse.ArgumentParser) -> None:
        p.add_argument("--scheme", default="ARGON2ID", type=str.upper, choices=SCHEMES,
                       help="password scheme (default ARGON2ID)")
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input")

    add = actions.add_parser("add", help="add a user")
    common(add)
    secret(add)
    add.add_argument("--scram", action="store_true",
                     help="also store SCRAM-SHA-256/SCRAM-SHA-1 keys (extra fields)")
    add.add_argument("--maildir", metavar="TEMPLATE",
                     help="create the user's Maildir, e.g. /srv/mail/%%u")
    add.set_defaults(func=_run)

    change = actions.add_parser("change", help="change a user's password")
    common(change)
    secret(change)
    group = change.add_mutually_exclusive_group()
    group.add_argument("--scram", action="store_true", default=None,
                       help="store SCRAM keys (default: refresh them if the entry had them)")
    group.add_argument("--no-scram", dest="scram", action="store_false", help="drop SCRAM keys")
    change.set_defaults(func=_run)

    remove = actions.add_parser("remove", help="remove a user")
    common(remove)
    remove.set_defaults(func=_run)
