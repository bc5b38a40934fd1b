"""
Fuzz target: the Dovecot passwd-file parser (L{parse_passwd_file}) on any bytes.

It never raises; every record it keeps has a non-empty user name without
control characters or edge spaces (the key it is stored under), a known
scheme or C{None}, a line number within the file, and comes from the first
line naming that user.  Line by line, L{parse_passwd_line} answers a record,
C{None} or L{PasswdFileError} (its documented error), nothing else.
"""

from __future__ import annotations

from popservice.auth.passwdfile_format import PasswdRecord, parse_passwd_file, parse_passwd_line
from popservice.auth.schemes import SUPPORTED_SCHEMES, PasswdFileError


def TestOneInput(data: bytes) -> None:
    records = parse_passwd_file(data, "fuzz")
    assert isinstance(records, dict)
    lines = data.splitlines()
    first: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        try:
            record = parse_passwd_line(line, lineno)
        except PasswdFileError:
            continue
        if record is not None:
            assert isinstance(record, PasswdRecord)
            first.setdefault(record.user, lineno)
    assert set(first) == set(records), (sorted(first), sorted(records))
    for user, record in records.items():
        assert record.user == user and user, record
        assert user == user.strip() and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in user), record
        assert record.lineno == first[user], (record, first[user])
        assert record.scheme is None or record.scheme in SUPPORTED_SCHEMES, record
        assert isinstance(record.recoverable, bool)
        home = record.home_directory
        assert home is None or isinstance(home, str)
        for key, value in record.extra.items():
            assert key and isinstance(value, str), record
