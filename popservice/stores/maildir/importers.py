"""
Taking UIDLs over from the server being replaced, so that clients do not
download everything again after a migration (RFC 1939 section 7: a UIDL
must stay the same across sessions).

Used only while a Maildir has no readable C{popservice-uidlist}: first
Dovecot's C{dovecot-uidlist} (versions 1 and 3, with the UIDLs computed by
Dovecot's C{pop3_uidl_format}, see L{DovecotUIDLFormat}), else Courier's
C{courierpop3dsizelist} (versions 2 and 3), else a fresh index.
L{_load_index} makes that choice.
"""

from __future__ import annotations

import os
import re

from twisted.logger import Logger

from popservice.stores.maildir.layout import base_name
from popservice.stores.maildir.order import _DIGITS_RE
from popservice.stores.maildir.uidlist import (
    _UIDL_RE,
    INDEX_FILE_NAME,
    _fresh_uidvalidity,
    _Index,
    _read_text,
    parse_index,
)

__all__ = [
    "COURIER_SIZELIST",
    "DEFAULT_DOVECOT_UIDL_FORMAT",
    "DOVECOT_UIDLIST",
    "DovecotUIDLFormat",
    "parse_courier_sizelist",
    "parse_dovecot_uidlist",
]

log = Logger(namespace="popservice.stores.maildir")

DOVECOT_UIDLIST = "dovecot-uidlist"
COURIER_SIZELIST = "courierpop3dsizelist"
#: Dovecot's default C{pop3_uidl_format}.
DEFAULT_DOVECOT_UIDL_FORMAT = "%08Xu%08Xv"


# --------------------------------------------------------------------------
# Dovecot pop3_uidl_format

_FORMAT_TOKEN = re.compile(
    r"%(?:(?P<percent>%)|(?P<zero>0?)(?P<width>[0-9]{0,2})(?P<mods>[LUX]*)"
    r"(?:(?P<short>[uvfg])|\{(?P<long>uid|uidvalidity|filename|guid)\}))"
)
_LONG_NAMES = {"uid": "u", "uidvalidity": "v", "filename": "f", "guid": "g"}


class DovecotUIDLFormat:
    """
    A subset of Dovecot's C{pop3_uidl_format} variables: C{%u}/C{%{uid}},
    C{%v}/C{%{uidvalidity}}, C{%f}/C{%{filename}} (base name), C{%g}/C{%{guid}}
    (the C{G} extension, else the base name), with zero padding and width and
    the modifiers C{X} (hex, lower case, as Dovecot prints it), C{L} and C{U}.
    C{%m} (MD5 of the header) is not supported: it would need every message
    read at takeover.
    """

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        pos = 0
        self._parts: list[tuple[str, bool, int, str]] = []  # (literal or var, is_var, width, zero+mods)
        for m in _FORMAT_TOKEN.finditer(fmt):
            literal = fmt[pos:m.start()]
            if "%" in literal:
                raise ValueError(f"unsupported pop3_uidl_format variable in {fmt!r}")
            if literal:
                self._parts.append((literal, False, 0, ""))
            if m.group("percent"):
                self._parts.append(("%", False, 0, ""))
            else:
                var = m.group("short") or _LONG_NAMES[m.group("long")]
                width = int(m.group("width") or "0")
                self._parts.append((var, True, width, m.group("zero") + m.group("mods")))
            pos = m.end()
        tail = fmt[pos:]
        if "%" in tail:
            raise ValueError(f"unsupported pop3_uidl_format variable in {fmt!r}")
        if tail:
            self._parts.append((tail, False, 0, ""))
        if not any(is_var for _, is_var, _, _ in self._parts):
            raise ValueError(f"pop3_uidl_format {fmt!r} has no variable: every UIDL would be equal")

    def format(self, uid: int, uidvalidity: int, filename: str, guid: str | None) -> str:
        out = []
        values = {"u": str(uid), "v": str(uidvalidity), "f": filename, "g": guid or filename}
        for text, is_var, width, mods in self._parts:
            if not is_var:
                out.append(text)
                continue
            value = values[text]
            for mod in mods.lstrip("0"):
                if mod == "X":
                    value = f"{int(value):x}" if _DIGITS_RE.match(value) else value.encode(
                        "utf-8", "surrogateescape").hex()
                elif mod == "L":
                    value = value.lower()
                elif mod == "U":
                    value = value.upper()
            if width:
                value = value.rjust(width, "0" if mods.startswith("0") else " ")
            out.append(value)
        return "".join(out)


# --------------------------------------------------------------------------
# dovecot-uidlist


def parse_dovecot_uidlist(
    text: str, uidl_format: DovecotUIDLFormat
) -> tuple[_Index, dict[str, int]] | None:
    """
    Take over UIDLs from a Dovecot C{dovecot-uidlist} (versions 1 and 3).

    Version 3: header C{3 V<uidvalidity> N<nextuid> [G<guid> ...]}, then
    C{<uid> [<ext> ...] :<filename>}; extensions used here: C{P<uidl>} (a POP3
    UIDL Dovecot itself took over: wins), C{W<vsize>} (the transmitted size,
    what Dovecot lists), C{G<guid>}.  Version 1 (Courier-compatible): header
    C{1 <uidvalidity> <nextuid>}, lines C{<uid> <filename>}.

    Returns the index (uidvalidity and counter continued from Dovecot's, so
    new UIDLs never collide with taken-over ones) and the Dovecot sizes.
    """
    lines = text.split("\n")
    header = lines[0].split()
    if not header or header[0] not in ("1", "3"):
        return None
    uidvalidity = next_uid = None
    if header[0] == "1":
        if len(header) >= 3 and _DIGITS_RE.match(header[1]) and _DIGITS_RE.match(header[2]):
            uidvalidity, next_uid = int(header[1]), int(header[2])
    else:
        for field in header[1:]:
            if field[:1] == "V" and _DIGITS_RE.match(field[1:]):
                uidvalidity = int(field[1:])
            elif field[:1] == "N" and _DIGITS_RE.match(field[1:]):
                next_uid = int(field[1:])
    if uidvalidity is None or next_uid is None:
        return None
    index = _Index(uidvalidity, next_uid)
    sizes: dict[str, int] = {}
    max_uid = 0
    for line in lines[1:]:
        if not line:
            continue
        if header[0] == "1":
            uid_s, _, filename = line.partition(" ")
            exts: list[str] = []
        else:
            fields, sep, filename = line.partition(" :")
            if not sep:
                fields, sep, filename = line.partition(":")
            tokens = fields.split()
            if not tokens:
                continue
            uid_s, exts = tokens[0], tokens[1:]
        if not _DIGITS_RE.match(uid_s) or not filename:
            continue
        uid = int(uid_s)
        base = base_name(filename)
        max_uid = max(max_uid, uid)
        ext = {t[0]: t[1:] for t in exts if t}
        uidl = ext.get("P") or uidl_format.format(uid, uidvalidity, base, ext.get("G"))
        if not _UIDL_RE.match(uidl):
            log.warn("dovecot-uidlist: UIDL of {base} is not a valid POP3 UIDL; it gets a new one",
                     base=base)
            continue
        if "W" in ext and _DIGITS_RE.match(ext["W"]):
            sizes[base] = int(ext["W"])
        index.entries[base] = (uidl, -1)
    index.next_uid = max(index.next_uid, max_uid + 1)
    return index, sizes


# --------------------------------------------------------------------------
# courierpop3dsizelist


def _courier_uidl(filename: str) -> str:
    """Courier's "version 0" UIDL: the base name, with unsafe bytes as C{+XX}."""
    out = []
    for b in base_name(filename).encode("utf-8", "surrogateescape"):
        if b < 0x21 or b > 0x7E or b in (0x27, 0x22, 0x2B):
            out.append(f"+{b:02X}")
        else:
            out.append(chr(b))
    return "".join(out)


def parse_courier_sizelist(text: str) -> _Index | None:
    """
    Take over UIDLs from Courier's C{courierpop3dsizelist}.

    Format, as Courier's pop3dserver.c reads and writes it (LISTVERSION 3;
    version 2 has no C{:<utf8>} part): header C{/<version> <nextuid> <uidv>},
    then C{<filename> <size> <uid>:<uidv>[:<utf8>]}; the file name may carry
    its C{:2,FLAGS}.  Courier's UIDL is C{UID<uid>-<uidv>} (C{UID<uid>} when
    uidv is 0; for uid 0 the escaped base name).  Files of the old, header-less
    format are ignored, as Courier ignores them.

    Courier's sizes are not taken over: Courier counts one CR per LF (wrong for
    files already stored with CRLF) and adds 2 for a CRLF it appends to an
    unterminated last line, so they can differ from L{transmitted_size}.
    Our own UIDLs (C{%08x%08x}) cannot collide with C{UID...} ones.
    """
    lines = text.split("\n")
    head = lines[0]
    if not head.startswith("/"):
        return None
    hfields = head[1:].split()
    if len(hfields) < 2 or hfields[0] not in ("2", "3") or not all(_DIGITS_RE.match(f) for f in hfields):
        return None
    index = _Index(_fresh_uidvalidity(), 1)
    for line in lines[1:]:
        parts = line.rsplit(" ", 2)
        if len(parts) != 3 or not parts[0]:
            continue
        filename, _size, uidpart = parts
        nums = uidpart.split(":")
        if len(nums) < 2 or not _DIGITS_RE.match(nums[0]) or not _DIGITS_RE.match(nums[1]):
            continue
        n, uidv = int(nums[0]), int(nums[1])
        if n == 0:
            uidl = _courier_uidl(filename)
        elif uidv:
            uidl = f"UID{n}-{uidv}"
        else:
            uidl = f"UID{n}"
        if not _UIDL_RE.match(uidl):
            continue
        index.entries[base_name(filename)] = (uidl, -1)
    return index


# --------------------------------------------------------------------------
# Our index, else a takeover


def _load_index(
    path: str, uidl_format: DovecotUIDLFormat, raw: bytes | None
) -> tuple[_Index, dict[str, int], bool]:
    """
    The index of C{path}, whose content is C{raw} (C{None}: there is none):
    (index, sizes known from an import, dirty).  Falls back to taking over
    Dovecot's or Courier's UIDLs, then to a fresh index.
    """
    index_path = os.path.join(path, INDEX_FILE_NAME)
    text = None if raw is None else raw.decode("utf-8", "surrogateescape")
    previous_v: int | None = None
    if text is not None:
        index = parse_index(text, index_path)
        if index is not None:
            return index, {}, False
        m = re.match(r"popservice-uidlist 1 V([0-9]{1,10})", text)
        previous_v = int(m.group(1)) if m else None
        log.error("{path} is unreadable: rebuilding it; the UIDLs of every message in this mailbox change",
                  path=index_path)
    dovecot = _read_text(os.path.join(path, DOVECOT_UIDLIST))
    if dovecot is not None:
        parsed = parse_dovecot_uidlist(dovecot, uidl_format)
        if parsed is not None:
            log.info("took over {count} UIDLs from {file} in {path} (uidvalidity {v})",
                     count=len(parsed[0].entries), file=DOVECOT_UIDLIST, path=path, v=parsed[0].uidvalidity)
            return parsed[0], parsed[1], True
        log.warn("{file} in {path} has an unknown format: not taken over", file=DOVECOT_UIDLIST, path=path)
    courier = _read_text(os.path.join(path, COURIER_SIZELIST))
    if courier is not None:
        cindex = parse_courier_sizelist(courier)
        if cindex is not None:
            log.info("took over {count} UIDLs from {file} in {path}",
                     count=len(cindex.entries), file=COURIER_SIZELIST, path=path)
            return cindex, {}, True
        log.warn("{file} in {path} has an unknown format: not taken over", file=COURIER_SIZELIST, path=path)
    return _Index(_fresh_uidvalidity(previous_v), 1), {}, True
