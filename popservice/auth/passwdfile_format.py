# -*- test-case-name: tests.test_passwdfile -*-
"""
The Dovecot passwd-file format: the record type and the parser.

File format (one user per line, C{#} comments and blank lines ignored)::

    user:password:uid:gid:(gecos):home:(shell):extra_fields

Every field after the password is optional.  The password may start with a
C{{SCHEME}} prefix (C{{SCHEME.HEX}} / C{{SCHEME.B64}} select the encoding of
digest schemes); without one it is a C{crypt(3)} string (Dovecot's default
scheme, CRYPT).  Extra fields are space-separated C{key=value} pairs (a bare
C{key} means C{key=""}); they may contain colons.  The first entry of a user
wins over later duplicates, as in Dovecot.

The schemes themselves are in L{popservice.auth.schemes}; reading the file
and re-reading it when it changes is L{popservice.auth.passwdfile}'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.logger import Logger

from popservice.auth.schemes import RECOVERABLE_SCHEMES, PasswdFileError, UnknownSchemeError, split_scheme

__all__ = ["PasswdRecord", "parse_passwd_file", "parse_passwd_line"]

# The namespace of the module this code came from, so log filters keep working.
log = Logger(namespace="popservice.auth.passwdfile")


@dataclass(frozen=True)
class PasswdRecord:
    """
    One passwd-file entry.  Optional fields absent or empty in the file are
    C{None}.  C{scheme} is C{None} when the password field is empty or its
    scheme is unknown: such a user cannot log in.
    """

    user: str
    #: the password field as written, C{{SCHEME}} prefix included (secret!)
    password: str = field(repr=False)
    scheme: str | None
    uid: str | None = None
    gid: str | None = None
    gecos: str | None = None
    home: str | None = None
    shell: str | None = None
    #: extra fields, e.g. C{{"userdb_quota_rule": "*:storage=1G", "login_delay": "60"}}
    extra: Mapping[str, str] = field(default_factory=dict)
    #: line number in the file (1-based), for log messages
    lineno: int = 0

    @property
    def recoverable(self) -> bool:
        """True if the stored secret is the plaintext password."""
        return self.scheme in RECOVERABLE_SCHEMES

    @property
    def home_directory(self) -> str | None:
        """The home field, else the C{userdb_home} / C{home} extra field."""
        return self.home or self.extra.get("userdb_home") or self.extra.get("home") or None


def _bad_char(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def parse_passwd_line(line: str, lineno: int = 0) -> PasswdRecord | None:
    """
    Parse one line; C{None} for blank and comment lines.

    @raise PasswdFileError: for a malformed line (message without secrets).
    @raise UnknownSchemeError: never; an unknown scheme gives C{scheme=None}.
    """
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    if ":" not in line:
        raise PasswdFileError("no ':' after the user name")
    fields = line.split(":", 7)
    user, password = fields[0], fields[1]
    if not user:
        raise PasswdFileError("empty user name")
    if _bad_char(user) or user != user.strip():
        raise PasswdFileError("user name has control characters or edge spaces")
    if _bad_char(password):
        raise PasswdFileError("password field has control characters")
    rest: list[str | None] = [f or None for f in fields[2:7]]
    rest += [None] * (5 - len(rest))
    extra: dict[str, str] = {}
    if len(fields) == 8:
        for token in fields[7].split():
            key, _, value = token.partition("=")
            if not key:
                raise PasswdFileError("extra field without a name")
            extra[key] = value
    scheme: str | None = None
    if password:
        try:
            scheme = split_scheme(password)[0]
        except UnknownSchemeError:
            scheme = None
    uid, gid, gecos, home, shell = rest
    return PasswdRecord(user, password, scheme, uid, gid, gecos, home, shell, extra, lineno)


def parse_passwd_file(data: bytes, source: str = "<passwd-file>") -> dict[str, PasswdRecord]:
    """
    Parse a whole passwd-file.  Malformed lines, duplicates (the first entry
    wins, as in Dovecot) and unknown schemes are logged with their line
    number, never with their content.
    """
    records: dict[str, PasswdRecord] = {}
    unknown: dict[str, list[int]] = {}
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            log.warn("{source}:{lineno}: skipped: not UTF-8", source=source, lineno=lineno)
            continue
        try:
            record = parse_passwd_line(line, lineno)
        except PasswdFileError as e:
            log.warn("{source}:{lineno}: skipped: {reason}", source=source, lineno=lineno, reason=str(e))
            continue
        if record is None:
            continue
        if record.user in records:
            log.warn(
                "{source}:{lineno}: skipped: user {user!r} already defined on line {first}",
                source=source,
                lineno=lineno,
                user=record.user,
                first=records[record.user].lineno,
            )
            continue
        if record.password and record.scheme is None:
            try:
                split_scheme(record.password)
            except (UnknownSchemeError, PasswdFileError) as e:
                unknown.setdefault(str(e), []).append(lineno)
        records[record.user] = record
    for scheme, lines in unknown.items():
        log.warn(
            "{source}: unknown password scheme {scheme!r} on lines {lines}: those users cannot log in",
            source=source,
            scheme=scheme,
            lines=", ".join(map(str, lines)),
        )
    return records
