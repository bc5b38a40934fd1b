"""
The Maildir on disk (the Maildir format of qmail, as Dovecot and Courier
use it): the C{cur/}, C{new/} and C{tmp/} directories, base names (the file
name up to the first C{:}, the C{:2,FLAGS} info part excluded), which files
count as messages, the move of C{new/X} to C{cur/X:2,} at login, and finding
a message again after another program renamed it.

Every file is opened without following symbolic links (L{_nofollow_opener},
also used to open a message for reading), and L{outside_root} finds a
Maildir, or a C{cur/}, C{new/} or C{tmp/} of it, that a symbolic link leads
out of the mail root.  The directory work runs in the reactor's thread pool.
"""

from __future__ import annotations

import os
import stat

from twisted.logger import Logger

from popservice.interfaces import MailboxUnavailable

__all__ = ["base_name", "ensure_maildir", "outside_root"]

log = Logger(namespace="popservice.stores.maildir")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def base_name(filename: str) -> str:
    """The key of a Maildir file: its name up to the first C{:}."""
    return filename.split(":", 1)[0]


def _acceptable_name(name: str) -> bool:
    # dotfiles are not messages; a line end in a name cannot go into the index
    return (bool(name) and not name.startswith((".", ":")) and "\n" not in name
            and "\r" not in name)


def _nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | _NOFOLLOW | _CLOEXEC)


def _relpath(file: str) -> str:
    """The path, relative to the Maildir, of an entry of L{_Scan.files}."""
    return file if "/" in file else "cur/" + file


def _file_base(file: str) -> str:
    """The base name of an entry of L{_Scan.files}."""
    return base_name(file.rpartition("/")[2])


def outside_root(path: str, root: str) -> tuple[str, str] | None:
    """
    The first of the Maildir C{path} and its C{cur/}, C{new/}, C{tmp/} that,
    symbolic links resolved, is neither C{root} nor below it, with where it
    leads; C{None} when all stay inside.  What does not exist yet resolves as
    far as it exists (L{ensure_maildir} makes it as a directory).  A few
    C{lstat} calls: cheap enough to run before every login.
    """
    real_root = os.path.realpath(root)
    inside = real_root.rstrip("/") + "/"
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(inside):
        return path, real
    for sub in ("cur", "new", "tmp"):
        candidate = os.path.join(path, sub)
        try:
            if not stat.S_ISLNK(os.lstat(candidate).st_mode):
                continue
        except OSError:
            continue
        target = os.path.realpath(candidate)
        if target != real_root and not target.startswith(inside):
            return candidate, target
    return None


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
