"""
A Maildir mail store: L{MaildirStore} (L{IMailStore}) and L{MaildirMailbox}
(L{IMailbox}).

Layout and rules (see also /work/shared/pop3-notes.md, "Maildir"):

 - A message is a file in C{new/} or C{cur/}; its I{base name} (key) is the
   file name up to the first C{:} (the C{:2,FLAGS} info part excluded), which
   other programs never change when they flag or move a message.
 - At login, C{new/X} is renamed C{cur/X:2,} (as Dovecot does), then messages
   are numbered oldest first by the integer time stamp that starts the base
   name (ties and non-numeric names by base name).  The listing is frozen for
   the session.
 - UIDLs and sizes live in a small index file in the Maildir,
   C{popservice-uidlist} (format below), replaced atomically (write a temporary
   file, fsync, rename).  A UIDL is assigned once, at first sight, from a
   monotonic counter, and never changes or comes back.  A warm login reads no
   message file: sizes come from C{,W=} in the name or from the index.  When
   the files match the index, nothing is written, and the listing is made
   with whole-list operations (no per-message Python code), or taken from a
   small per-process cache keyed by the index's exact content.
 - Without an index, UIDLs are taken over from C{dovecot-uidlist} or
   C{courierpop3dsizelist} when present, so clients do not download everything
   again after a migration.

Index file format (UTF-8; file names as on disk, undecodable bytes kept)::

    popservice-uidlist 1 V<uidvalidity> N<next uid>
    <uidl> <size> <base name>
    ...

C{<uidl>} is 1-70 characters in 0x21-0x7E (no space), C{<size>} the
transmitted size in decimal (C{-} for a taken-over UIDL whose file could not
be read yet: kept, not listed, retried at the next login), and C{<base name>} the rest of the line (it may
contain spaces).  Newly assigned UIDLs are C{"%08x%08x" % (uid, uidvalidity)},
which is exactly what Dovecot's default C{pop3_uidl_format = %08Xu%08Xv}
produces (Dovecot's C{X} modifier prints lower-case hex), so after a takeover
from Dovecot, new messages get the ids Dovecot itself would have given.

Filesystem work (directory scan, size computation, unlinking) runs in the
reactor's thread pool; reading an open message file is done synchronously in
64 KiB chunks (local reads are fast).
"""

from __future__ import annotations

import contextlib
import fcntl
import operator
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, NamedTuple

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from popservice.interfaces import (
    IExpiringMailbox,
    IMailbox,
    IMailboxLock,
    IMailStore,
    IMessageStream,
    MailboxInUse,
    MailboxUnavailable,
    MessageGone,
    MessageInfo,
)
from popservice.stores.lock import LOCK_FILE_NAME, FcntlMailboxLock
from popservice.stores.retrieval import RetrievalLog
from popservice.wire import transmitted_size

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_DOVECOT_UIDL_FORMAT",
    "INDEX_FILE_NAME",
    "MaildirMailbox",
    "MaildirMessageStream",
    "MaildirStore",
    "base_name",
    "message_sort_key",
    "valid_user_name",
]

log = Logger(namespace="popservice.stores.maildir")

#: Chunk size of L{MaildirMessageStream.read} and of size computation.
CHUNK_SIZE = 64 * 1024
#: The popservice UIDL/size index inside each Maildir.
INDEX_FILE_NAME = "popservice-uidlist"
#: Short-lived lock serialising read-modify-write of the index.
INDEX_LOCK_NAME = "popservice-uidlist.lock"
_INDEX_HEADER = "popservice-uidlist 1"
DOVECOT_UIDLIST = "dovecot-uidlist"
COURIER_SIZELIST = "courierpop3dsizelist"
#: Dovecot's default C{pop3_uidl_format}.
DEFAULT_DOVECOT_UIDL_FORMAT = "%08Xu%08Xv"

_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")
_UIDL_RE = re.compile(r"[\x21-\x7e]{1,70}\Z")
_W_RE = re.compile(r",W=([0-9]{1,18})(?=,|\Z)")
_DIGITS_RE = re.compile(r"[0-9]+\Z")
_INDEX_HEADER_RE = re.compile(r"popservice-uidlist 1 V([0-9]{1,10}) N([0-9]{1,12})\Z")

_SIZE_OF = operator.itemgetter(1)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


# --------------------------------------------------------------------------
# Names


def valid_user_name(user: str) -> bool:
    """May C{user} be substituted into a path?  Strict: no C{/}, no C{..}, no NUL."""
    return bool(_USER_RE.match(user)) and ".." not in user


def base_name(filename: str) -> str:
    """The key of a Maildir file: its name up to the first C{:}."""
    return filename.split(":", 1)[0]


def message_sort_key(base: str) -> "tuple[int, int, str]":
    """
    Oldest first: by the integer time stamp before the first C{.}, ties by the
    base name; names without a numeric time stamp after all others, by name.
    """
    head = base.split(".", 1)[0]
    if _DIGITS_RE.match(head):
        return (0, int(head), base)
    return (1, 0, base)


def _w_size(base: str) -> int | None:
    """The C{,W=<n>} size (CRLF line ends) recorded in a base name, if any."""
    m = _W_RE.search(base)
    return int(m.group(1)) if m else None


def _acceptable_name(name: str) -> bool:
    # dotfiles are not messages; a line end in a name cannot go into the index
    return (bool(name) and not name.startswith((".", ":")) and "\n" not in name
            and "\r" not in name)


def _nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | _NOFOLLOW | _CLOEXEC)


def compute_size(path: str) -> int:
    """The transmitted size of the message file at C{path}, read in chunks."""
    with open(path, "rb", opener=_nofollow_opener) as f:

        def chunks() -> Iterator[bytes]:
            while True:
                chunk = f.read(CHUNK_SIZE)
                if not chunk:
                    return
                yield chunk

        return transmitted_size(chunks())


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
# The index


#: An index entry: (UIDL, transmitted size); size -1 for a taken-over UIDL
#: whose file could not be read yet.
_Entry = tuple[str, int]


class _Index:
    """The UIDL/size index of one Maildir, in memory."""

    __slots__ = ("uidvalidity", "next_uid", "entries", "_used")

    def __init__(self, uidvalidity: int, next_uid: int, entries: dict[str, _Entry] | None = None) -> None:
        self.uidvalidity = uidvalidity
        self.next_uid = max(1, next_uid)
        #: base name -> entry; in file order when parsed
        self.entries: dict[str, _Entry] = {} if entries is None else entries
        self._used: set[str] | None = None

    def new_uidl(self) -> str:
        """The next UIDL: C{%08x%08x} of (counter, uidvalidity); never one in use."""
        if self._used is None:
            self._used = {e[0] for e in self.entries.values()}
        while True:
            n = self.next_uid
            self.next_uid += 1
            uidl = f"{n:08x}{self.uidvalidity:08x}"
            if uidl not in self._used:  # only possible next to foreign (taken-over) UIDLs
                self._used.add(uidl)
                return uidl

    def serialise(self) -> bytes:
        entries = self.entries
        lines = [f"{_INDEX_HEADER} V{self.uidvalidity} N{self.next_uid}\n"]
        for base in _sorted_bases(list(entries)):
            uidl, size = entries[base]
            # "-": a taken-over UIDL whose file could not be read yet; kept, not listed
            lines.append(f"{uidl} {size if size >= 0 else '-'} {base}\n")
        return "".join(lines).encode("utf-8", "surrogateescape")


def _plain_order(bases: list[str]) -> bool:
    """
    Is plain string order the L{message_sort_key} order of C{bases}?  It is
    when every base name starts with a time stamp of the same number of digits
    followed by C{.} (all names delivered since 2001), and checking that costs
    no per-name Python code.
    """
    if not bases:
        return True
    width = bases[0].find(".")
    if width <= 0:
        return False
    heads = "".join(map(operator.itemgetter(slice(0, width + 1)), bases))
    n = len(bases)
    if len(heads) != n * (width + 1) or heads[width::width + 1] != "." * n:
        return False
    digits = heads.replace(".", "")
    return len(digits) == n * width and digits.isascii() and digits.isdigit()


def _sorted_bases(bases: list[str]) -> list[str]:
    """C{bases} sorted by L{message_sort_key} (fast on sorted or nearly sorted input)."""
    if _plain_order(bases):
        return sorted(bases)
    return sorted(bases, key=message_sort_key)


def _fresh_uidvalidity(previous: int | None = None) -> int:
    v = int(time.time()) & 0xFFFFFFFF
    if previous is not None and v <= previous:
        v = (previous + 1) & 0xFFFFFFFF
    return max(v, 1)


def _read_bytes(path: str) -> bytes | None:
    """The file's content, or C{None} when it does not exist."""
    try:
        with open(path, "rb", opener=_nofollow_opener) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _read_text(path: str) -> str | None:
    """The file's text, or C{None} when it does not exist."""
    data = _read_bytes(path)
    return None if data is None else data.decode("utf-8", "surrogateescape")


def _parse_index_lines_fast(body: str) -> dict[str, _Entry] | None:
    """
    The entries of a well-formed index body (every line C{<uidl> <size> <base>}
    with a space-free base name, sizes all known, no blank line), split with a
    few whole-text operations; C{None} when the body is not of that simple kind.
    """
    if not body:
        return {}
    n = body.count("\n")
    if body[-1] != "\n" or body.count(" ") != 2 * n or "\n\n" in body or body[0] == "\n":
        return None
    # "u s b\n" -> "u s b \n " -> [u, s, b, "\n", ...]: a line end in every fourth
    # field, and only there, proves that each line has exactly three fields
    fields = body.replace("\n", " \n ").split(" ")
    fields.pop()  # the "" after the last line end
    if len(fields) != 4 * n or fields[3::4].count("\n") != n:
        return None
    uidls, sizes, bases = fields[0::4], fields[1::4], fields[2::4]
    if "" in uidls or "" in sizes or "" in bases or max(map(len, uidls)) > 70:
        return None
    joined = "".join(uidls)
    # (no space can be left in a field: isprintable() then means 0x21-0x7E)
    if not (joined.isascii() and joined.isprintable()):
        return None
    joined = "".join(sizes)
    if not (joined.isascii() and joined.isdigit()):
        return None
    return dict(zip(bases, zip(uidls, map(int, sizes), strict=True), strict=True))


def parse_index(text: str, where: str = INDEX_FILE_NAME) -> _Index | None:
    """Parse a popservice index; C{None} when its header is unreadable."""
    head, _, body = text.partition("\n")
    m = _INDEX_HEADER_RE.match(head)
    if not m:
        return None
    index = _Index(int(m.group(1)), int(m.group(2)))
    entries = _parse_index_lines_fast(body)
    if entries is not None:
        index.entries = entries
        return index
    entries = index.entries
    for lineno, line in enumerate(body.split("\n"), start=2):
        if not line:
            continue
        parts = line.split(" ", 2)
        if (len(parts) != 3 or not _UIDL_RE.match(parts[0])
                or not (_DIGITS_RE.match(parts[1]) or parts[1] == "-") or not parts[2]):
            log.warn("{where}: skipping malformed line {lineno} (its message gets a new UIDL)",
                     where=where, lineno=lineno)
            continue
        entries[parts[2]] = (parts[0], int(parts[1]) if parts[1] != "-" else -1)
    return index


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
# The store


class _Scan(NamedTuple):
    """The session listing of a Maildir, oldest first, as parallel lists."""

    #: where each message is: its name in cur/ (most), else C{"new/<name>"}; see L{_relpath}
    files: list[str]
    infos: list[MessageInfo]


def _relpath(file: str) -> str:
    """The path, relative to the Maildir, of an entry of L{_Scan.files}."""
    return file if "/" in file else "cur/" + file


def _file_base(file: str) -> str:
    """The base name of an entry of L{_Scan.files}."""
    return base_name(file.rpartition("/")[2])


@implementer(IMailStore)
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
    """

    def __init__(
        self,
        template: str,
        *,
        lock_policy: str = "exclusive",
        dovecot_uidl_format: str = DEFAULT_DOVECOT_UIDL_FORMAT,
        lock_factory: Callable[[str], IMailboxLock] | None = None,
    ) -> None:
        if lock_policy not in ("exclusive", "none"):
            raise ValueError(f"lock_policy must be 'exclusive' or 'none', not {lock_policy!r}")
        self._check_template(template)
        self.template = template
        self.lock_policy = lock_policy
        self.uidl_format = DovecotUIDLFormat(dovecot_uidl_format)
        self._lock_factory = lock_factory

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

    def _make_lock(self, path: str) -> IMailboxLock | None:
        if self.lock_policy == "none":
            return None
        if self._lock_factory is not None:
            return self._lock_factory(path)
        return FcntlMailboxLock(os.path.join(path, LOCK_FILE_NAME))

    def open_mailbox(self, user: str, home: "str | None") -> "defer.Deferred[IMailbox]":
        """
        Deferred firing with the locked, scanned L{MaildirMailbox} of C{user};
        failing with L{MailboxInUse} or L{MailboxUnavailable} only.
        """
        try:
            path = self.maildir_path(user, home)
        except MailboxUnavailable as e:
            return defer.fail(e)
        return defer.Deferred.fromCoroutine(self._open(path))

    async def _open(self, path: str) -> IMailbox:
        lock = self._make_lock(path)
        try:
            if not all(os.path.isdir(os.path.join(path, sub)) for sub in ("cur", "new", "tmp")):
                # Usually there already: one stat here instead of a thread hop.
                await deferToThread(ensure_maildir, path)
            if lock is not None:
                await defer.maybeDeferred(lock.acquire)
            messages = await deferToThread(scan_maildir, path, self.uidl_format)
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
        return MaildirMailbox(path, messages, lock)


def _translate(e: BaseException, what: str) -> Exception:
    """
    Expected failures pass; OSError and anything unexpected become
    L{MailboxUnavailable}.  Call it inside the C{except} block (it may log the
    current traceback).
    """
    if isinstance(e, (MailboxInUse, MailboxUnavailable, MessageGone)):
        return e
    if isinstance(e, OSError):
        log.warn("{what}: {error}", what=what, error=e)
    else:
        log.failure("unexpected error {what}", what=what)
    return MailboxUnavailable("mailbox temporarily unavailable")


# --------------------------------------------------------------------------
# Filesystem work (runs in a thread)


def ensure_maildir(path: str) -> None:
    """Create the Maildir and its cur/new/tmp (mode 0700) where missing."""
    try:
        for sub in ("", "cur", "new", "tmp"):
            d = os.path.join(path, sub) if sub else path
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o700, exist_ok=True)
                log.info("created Maildir directory {dir}", dir=d)
    except OSError as e:
        log.warn("cannot create Maildir {path}: {error}", path=path, error=e)
        raise MailboxUnavailable("cannot create Maildir") from e


@contextlib.contextmanager
def _index_lock(path: str) -> Iterator[None]:
    """Serialise read-modify-write of the index (a blocking flock; held briefly)."""
    fd = os.open(os.path.join(path, INDEX_LOCK_NAME), os.O_RDWR | os.O_CREAT | _CLOEXEC | _NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _regular_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _list_messages(path: str, sub: str) -> list[str]:
    """Regular, non-dot files of C{path/sub}; a missing directory is empty."""
    try:
        with os.scandir(os.path.join(path, sub)) as it:
            try:
                # (is_file uses the directory entry's type: no stat per file)
                names = [entry.name for entry in it if entry.is_file(follow_symlinks=False)]
            except OSError:
                names = None
        if names is None:  # a type had to be looked up and that failed: once more, carefully
            with os.scandir(os.path.join(path, sub)) as it:
                names = [entry.name for entry in it if _regular_file(entry)]
    except FileNotFoundError:
        return []
    # one check over all names instead of one per name (scandir gives no empty name)
    joined = "\0".join(names)
    if joined and (joined[0] in ".:" or "\0." in joined or "\0:" in joined
                   or "\n" in joined or "\r" in joined):
        names = [name for name in names if _acceptable_listed_name(name, path)]
    return names


def _acceptable_listed_name(name: str, path: str) -> bool:
    if _acceptable_name(name):
        return True
    if not name.startswith("."):
        log.warn("skipping Maildir file with a line end in its name in {path}", path=path)
    return False


def _find_all(path: str) -> dict[str, str]:
    """Base name -> entry of L{_Scan.files}, over cur/ then new/ (cur/ wins)."""
    names = _list_messages(path, "cur")
    found = dict(zip([name.partition(":")[0] for name in names], names, strict=True))
    for name in _list_messages(path, "new"):
        found.setdefault(base_name(name), "new/" + name)
    return found


def _find_one(path: str, base: str) -> str | None:
    """The entry of L{_Scan.files} of the message C{base}, if it is still there."""
    for sub in ("cur", "new"):
        for name in _list_messages(path, sub):
            if base_name(name) == base:
                return name if sub == "cur" else "new/" + name
    return None


_tmp_counter = 0
_tmp_lock = threading.Lock()


def _write_index(path: str, index: _Index) -> bytes:
    """
    Replace the index atomically: temporary file, fsync, rename, fsync the
    directory.  Returns the content written.
    """
    global _tmp_counter
    with _tmp_lock:
        _tmp_counter += 1
        n = _tmp_counter
    target = os.path.join(path, INDEX_FILE_NAME)
    tmp = f"{target}.tmp.{os.getpid()}.{n}"
    data = index.serialise()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC | _NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(path, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return data
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return data


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


class _ListingCache:
    """
    The listing last made from an index, per Maildir, for the life of the
    process: a warm login of a big Maildir whose files still match the index
    then neither parses the index nor makes its L{MessageInfo}s again.

    An entry is used only when the index file's whole content equals the one
    it was made from (so it is never stale, whoever wrote the file) and when
    the Maildir holds exactly its messages.  Only Maildirs of at least
    C{minimum} messages are kept, C{budget} messages in all (about 300 bytes
    each), the least recently used dropped first.
    """

    def __init__(self, budget: int, minimum: int) -> None:
        self.budget = budget
        self.minimum = minimum
        self._entries: OrderedDict[str, tuple[bytes, list[str], list[MessageInfo]]] = OrderedDict()
        self._messages = 0
        self._lock = threading.Lock()

    def get(self, path: str, raw: bytes) -> tuple[list[str], list[MessageInfo]] | None:
        """(base names, infos) made from index content C{raw} of C{path}, if kept."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return None
            if entry[0] != raw:
                del self._entries[path]
                self._messages -= len(entry[1])
                return None
            self._entries.move_to_end(path)
            return entry[1], entry[2]

    def put(self, path: str, raw: bytes, bases: list[str], infos: list[MessageInfo]) -> None:
        """Keep the listing (never modified afterwards) made from index content C{raw}."""
        if not self.minimum <= len(bases) <= self.budget:
            return
        with self._lock:
            old = self._entries.pop(path, None)
            if old is not None:
                self._messages -= len(old[1])
            self._entries[path] = (raw, bases, infos)
            self._messages += len(bases)
            while self._messages > self.budget:
                _, dropped = self._entries.popitem(last=False)
                self._messages -= len(dropped[1])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._messages = 0


#: Messages kept in L{_ListingCache} (about 300 bytes each, so some 15 MB).
LISTING_CACHE_MESSAGES = 50_000
#: Smaller Maildirs are scanned fast enough without it.
LISTING_CACHE_MINIMUM = 1_000
_listing_cache = _ListingCache(LISTING_CACHE_MESSAGES, LISTING_CACHE_MINIMUM)


def _clear_index_cache() -> None:
    """Forget every cached listing (tests, benchmarks)."""
    _listing_cache.clear()


def _move_new_to_cur(path: str) -> None:
    for name in _list_messages(path, "new"):
        target = name if ":" in name else name + ":2,"
        src = os.path.join(path, "new", name)
        dst = os.path.join(path, "cur", target)
        if os.path.lexists(dst):
            log.warn("not moving {name} to cur/: a file of that name is there already", name=name)
            continue
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            continue  # moved by another process: the cur/ listing finds it
        except OSError as e:
            log.warn("cannot move {name} from new/ to cur/: {error}", name=name, error=e)


def scan_maildir(path: str, uidl_format: DovecotUIDLFormat) -> _Scan:
    """
    The session listing of the Maildir at C{path}, oldest first, after moving
    new/ to cur/ and bringing the index up to date.  Runs in a thread.

    When the files match the index (a warm login with nothing new), this is a
    handful of whole-list operations, with no per-message Python code but the
    making of the L{MessageInfo}s, none at all when L{_listing_cache} has the
    listing of this index; the index is then not rewritten.
    """
    _move_new_to_cur(path)
    with _index_lock(path):
        raw = _read_bytes(os.path.join(path, INDEX_FILE_NAME))
        found = _find_all(path)
        if raw is not None:
            cached = _listing_cache.get(path, raw)
            if cached is not None:
                bases, cached_infos = cached
                if len(found) == len(bases) and all(map(found.__contains__, bases)):
                    return _Scan(list(map(found.__getitem__, bases)), cached_infos)
        index, import_sizes, dirty = _load_index(path, uidl_format, raw)
        entries = index.entries
        candidates = list(entries)
        added: list[str] = []
        if entries.keys() != found.keys():
            missing = entries.keys() - found.keys()
            if missing:
                # a rename by another program between two listings could hide a file
                # for a moment: look once more before forgetting its UIDL
                found = {**_find_all(path), **found}
                for b in missing:
                    if b not in found:
                        del entries[b]
                        dirty = True
                candidates = list(entries)
            added = list(found.keys() - entries.keys())  # new messages
            candidates += added
        # the index is kept in this order: sorting it again is cheap
        order = _sorted_bases(candidates)
        fresh: set[str] = set()
        unlisted: set[str] = set()
        pending = bool(entries) and min(map(_SIZE_OF, entries.values())) < 0
        if added or pending:
            # new messages, or taken-over UIDLs without a size: in order, so that
            # new UIDLs are given oldest first
            for base in order if pending else _sorted_bases(added):
                entry = entries.get(base)
                if entry is not None and entry[1] >= 0:
                    continue
                size = _w_size(base)
                if size is None and entry is not None:
                    size = import_sizes.get(base)
                if size is None:
                    relpath = _relpath(found[base])
                    try:
                        size = compute_size(os.path.join(path, relpath))
                    except OSError as e:
                        # a taken-over UIDL is kept (not listed) until its file can be read
                        log.warn("skipping unreadable message {file}: {error}", file=relpath, error=e)
                        unlisted.add(base)
                        continue
                if entry is None:
                    entries[base] = (index.new_uidl(), size)
                    fresh.add(base)
                else:
                    entries[base] = (entry[0], size)
                dirty = True
            if unlisted:
                order = [b for b in order if b not in unlisted]
        # the index content the listing follows from, if it lists every entry
        source: bytes | None = None if dirty or unlisted else raw
        if dirty:
            try:
                written = _write_index(path, index)
                if not unlisted:
                    source = written
            except OSError as e:
                # Like Courier: never show a UIDL that is not on disk, or it would
                # change at the next login.  New messages wait for a writable index.
                log.error("cannot write {file} in {path} ({error}): hiding {count} new messages",
                          file=INDEX_FILE_NAME, path=path, error=e, count=len(fresh))
                if fresh:
                    order = [b for b in order if b not in fresh]
    if not order:
        return _Scan([], [])
    uidls, stored_sizes = zip(*map(entries.__getitem__, order), strict=True)
    sizes: Sequence[int] = stored_sizes
    if ",W=" in "\0".join(order):
        # the size in the name wins (other programs trust it too)
        sizes = list(stored_sizes)
        for i, base in enumerate(order):
            if ",W=" in base:
                w = _w_size(base)
                if w is not None:
                    sizes[i] = w
    infos = list(map(MessageInfo, sizes, uidls))
    if source is not None:
        _listing_cache.put(path, source, order, infos)
    return _Scan(list(map(found.__getitem__, order)), infos)


def _remove_from_index(path: str, bases: Sequence[str]) -> None:
    with _index_lock(path):
        text = _read_text(os.path.join(path, INDEX_FILE_NAME))
        index = parse_index(text) if text is not None else None
        if index is None:
            return
        changed = False
        for b in bases:
            if index.entries.pop(b, None) is not None:
                changed = True
        if changed:
            _write_index(path, index)


# --------------------------------------------------------------------------
# Mailbox and message stream


@implementer(IMessageStream)
class MaildirMessageStream:
    """A message file read in chunks of L{CHUNK_SIZE}; closed at the end."""

    def __init__(self, f: BinaryIO, chunk_size: int = CHUNK_SIZE) -> None:
        self._file: BinaryIO | None = f
        self.chunk_size = chunk_size

    def read(self) -> "defer.Deferred[bytes]":
        f = self._file
        if f is None:
            return defer.succeed(b"")
        try:
            chunk = f.read(self.chunk_size)
        except OSError as e:
            self.close()
            log.warn("error reading a message file: {error}", error=e)
            return defer.fail(MailboxUnavailable("error reading message"))
        if not chunk:
            self.close()
        return defer.succeed(chunk)

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()


@implementer(IExpiringMailbox)
class MaildirMailbox:
    """
    One session's view of a Maildir: the listing frozen at open.  Indices are
    0-based positions in it.
    """

    def __init__(self, path: str, scan: _Scan, lock: IMailboxLock | None) -> None:
        self.path = path
        # per message only its file name (shared with the scan) and its
        # MessageInfo (shared with the session's listing): no record object
        self._files = scan.files
        self._infos = scan.infos
        self._deleted: set[int] = set()
        self._lock = lock
        self._closed = False

    def listing(self) -> "defer.Deferred[list[MessageInfo]]":
        return defer.succeed(list(self._infos))

    def _check(self, index: int) -> None:
        if self._closed:
            raise MailboxUnavailable("mailbox closed")
        if not 0 <= index < len(self._files):
            raise IndexError(f"no message {index}")

    def _open_file(self, index: int) -> BinaryIO:
        for attempt in (0, 1):
            try:
                return open(os.path.join(self.path, _relpath(self._files[index])), "rb",
                            opener=_nofollow_opener)
            except FileNotFoundError:
                if attempt:
                    break
                file = _find_one(self.path, _file_base(self._files[index]))
                if file is None:
                    break
                self._files[index] = file
        raise MessageGone(f"message {_file_base(self._files[index])} is gone")

    def open(self, index: int) -> "defer.Deferred[IMessageStream]":
        try:
            self._check(index)
            if index in self._deleted:
                raise MessageGone("message deleted")
            f = self._open_file(index)
        except (MessageGone, MailboxUnavailable, IndexError) as e:
            return defer.fail(e)
        except OSError as e:
            return defer.fail(_translate(e, "opening a message"))
        return defer.succeed(MaildirMessageStream(f))

    def _delete_sync(self, indices: list[int]) -> list[int]:
        failed: list[int] = []
        removed: list[str] = []
        where: dict[str, str] | None = None
        for i in indices:
            if not 0 <= i < len(self._files):
                failed.append(i)
                continue
            if i in self._deleted:
                continue
            file = self._files[i]
            base = _file_base(file)
            try:
                try:
                    os.unlink(os.path.join(self.path, _relpath(file)))
                except FileNotFoundError:
                    if where is None:
                        where = _find_all(self.path)
                    other = where.get(base)
                    if other is not None:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self.path, _relpath(other)))
            except OSError as e:
                log.warn("cannot delete {file} in {path}: {error}",
                         file=_relpath(file), path=self.path, error=e)
                failed.append(i)
                continue
            self._deleted.add(i)
            removed.append(base)
        if removed:
            try:
                _remove_from_index(self.path, removed)
            except OSError as e:  # the next scan forgets them anyway
                log.warn("cannot update {file} after deleting: {error}", file=INDEX_FILE_NAME, error=e)
        return failed

    def delete(self, indices: "list[int]") -> "defer.Deferred[list[int]]":
        if self._closed:
            return defer.fail(MailboxUnavailable("mailbox closed"))
        return defer.Deferred.fromCoroutine(self._delete(list(indices)))

    async def _delete(self, indices: list[int]) -> list[int]:
        try:
            return await deferToThread(self._delete_sync, indices)
        except Exception as e:
            raise _translate(e, f"deleting messages in {self.path}") from e

    def record_retrieved(self, indices: "list[int]", when: float) -> "defer.Deferred[None]":
        """RFC 2449 EXPIRE: remember when these messages were first retrieved."""
        uids = [self._infos[i].uid for i in indices if 0 <= i < len(self._infos) and i not in self._deleted]
        try:
            RetrievalLog(self.path).record(uids, when)
        except OSError as e:  # the message is merely kept longer
            log.warn("cannot record retrievals in {path}: {error}", path=self.path, error=e)
        return defer.succeed(None)

    def expire(self, days: int, now: float) -> "defer.Deferred[int]":
        """RFC 2449 EXPIRE: remove messages first retrieved C{days} days ago or earlier."""
        if self._closed:
            return defer.fail(MailboxUnavailable("mailbox closed"))
        return defer.Deferred.fromCoroutine(self._expire(days, now))

    async def _expire(self, days: int, now: float) -> int:
        try:
            return await deferToThread(self._expire_sync, days, now)
        except Exception as e:
            raise _translate(e, f"expiring messages in {self.path}") from e

    def _expire_sync(self, days: int, now: float) -> int:
        retrieval = RetrievalLog(self.path)
        old = retrieval.expired(days, now)
        if not old:
            return 0
        indices = [i for i, info in enumerate(self._infos) if info.uid in old]
        failed = set(self._delete_sync(indices))
        gone = {i for i in indices if i not in failed}
        # The session's listing never shows them: new lists (the old ones may be shared).
        keep = [i for i in range(len(self._files)) if i not in gone]
        self._files = [self._files[i] for i in keep]
        self._infos = [self._infos[i] for i in keep]
        self._deleted = set()
        present = {info.uid for info in self._infos}
        retrieval.forget(uid for uid in old if uid not in present)
        return len(gone)

    def close(self) -> "defer.Deferred[None]":
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        lock, self._lock = self._lock, None
        if lock is None:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._release(lock))

    async def _release(self, lock: IMailboxLock) -> None:
        try:
            await defer.maybeDeferred(lock.release)
        except Exception:
            log.failure("releasing the lock of {path}", path=self.path)

    def __repr__(self) -> str:
        return f"<MaildirMailbox {self.path!r}, {len(self._files)} messages>"
