#!/usr/bin/env python3
"""
The fixture bench/load.py and bench/run.py run against: Maildirs, Dovecot
passwd-files and a TLS certificate under one directory.

    DIR/mail/u0 .. u<N-1>   20 x 4 KiB messages each (sessions, login, latency)
    DIR/mail/big            one 50 MiB message (bigretr)
    DIR/mail/bigbox         10,000 x 1 KiB messages in new/, no index (a cold open)
    DIR/mail/i0 .. i4999    one 1 KiB message each (idle connections)
    DIR/mail/light          20 x 4 KiB, the one {PLAIN} user of passwd-argon2 (a cheap login among
                            argon2 ones, for latency-under)
    DIR/passwd-plain        every user, user:{PLAIN}pw-user:::::
    DIR/passwd-argon2       u*, big and bigbox, user:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$...:::::
                            (Dovecot's parameters; argon2-cffi hashes them, each with its own salt),
                            and light:{PLAIN}pw-light:::::
    DIR/tls/cert.pem, key.pem   a self-signed certificate for localhost and 127.0.0.1

The password of user X is pw-X.  Messages are LF-terminated (as Maildir
keeps them), no line starts with a dot; all but bigbox's are in cur/ with a
":2," suffix, so a first login renames nothing.  The idle users are left out
of passwd-argon2 (5,000 argon2 hashes take minutes; --argon2-idle adds them).

A fixture already made with the same parameters is left alone (DIR/fixture.json
records them); --force makes it again.  --recool USER puts that user's
messages back into new/ and removes the indexes (popservice's, Dovecot's), so
the next login opens a cold Maildir again.

    .venv/bin/python bench/fixture.py /tmp/popload [--users 100] [--idle 5000]
    .venv/bin/python bench/fixture.py /tmp/popload --recool bigbox
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence

#: index and cache files of popservice and Dovecot that make a Maildir warm
INDEX_FILES = ("popservice-uidlist", "dovecot-uidlist", "dovecot.index", "dovecot.index.cache",
               "dovecot.index.log", "dovecot.index.log.2", "dovecot-keywords")
BASE_TIME = 1_700_000_000
#: the user whose password is {PLAIN} in passwd-argon2 too
LIGHT = "light"
LINE = b"abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefg\n"


def message(user: str, number: int, size: int) -> bytes:
    """A message of exactly C{size} bytes (at least its headers), LF line ends."""
    head = (b"From: bench@example.org\nTo: %s@example.org\nSubject: message %d\n"
            b"Message-ID: <%d.%s@bench.example.org>\n\n" % (user.encode(), number, number, user.encode()))
    room = max(0, size - len(head))
    body = LINE * (room // len(LINE))
    rest = room - len(body)
    if rest:
        body += b"x" * (rest - 1) + b"\n" if rest > 1 else b"\n"
    return head + body


def maildir(root: str, user: str, count: int, size: int, new: bool = False) -> None:
    """C{count} messages of C{size} bytes for C{user}, in new/ or (flagged seen) in cur/."""
    path = os.path.join(root, "mail", user)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    for i in range(count):
        data = message(user, i + 1, size)
        name = "%d.M%dP%d.bench,S=%d" % (BASE_TIME + i, i, os.getpid(), len(data))
        where = os.path.join(path, "new", name) if new else os.path.join(path, "cur", name + ":2,")
        with open(where, "wb") as f:
            f.write(data)


def big_message(root: str, user: str, size: int) -> None:
    """One message of C{size} bytes, written in pieces."""
    path = os.path.join(root, "mail", user)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    head = message(user, 1, 0)
    chunk = LINE * ((1 << 20) // len(LINE))
    name = "%d.M0P%d.bench,S=%d:2," % (BASE_TIME, os.getpid(), size)
    with open(os.path.join(path, "cur", name), "wb") as f:
        f.write(head)
        left = size - len(head)
        while left > 0:
            piece = chunk[:left] if left >= len(chunk) else LINE * (left // len(LINE))
            if not piece:
                piece = b"x" * (left - 1) + b"\n"
            f.write(piece)
            left -= len(piece)


def argon2id(password: str) -> str:
    """A Dovecot C{{ARGON2ID}} stored password (Dovecot's own cost parameters)."""
    from argon2 import PasswordHasher, Type

    hasher = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=1, type=Type.ID)
    return "{ARGON2ID}" + hasher.hash(password)


def passwd_line(user: str, stored: str) -> str:
    return "%s:%s:::::\n" % (user, stored)


def password(user: str) -> str:
    return "pw-" + user


def write_passwd(path: str, lines: Sequence[str]) -> None:
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def certificate(root: str) -> None:
    from popservice.tlsutil import make_self_signed

    make_self_signed(os.path.join(root, "tls"))


def build(root: str, users: int, idle: int, bigbox: int, big_mib: int, argon2_idle: bool) -> None:
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(os.path.join(root, "mail"))
    names = ["u%d" % k for k in range(users)]
    for name in [*names, LIGHT]:
        maildir(root, name, 20, 4096)
    big_message(root, "big", big_mib << 20)
    maildir(root, "bigbox", bigbox, 1024, new=True)
    idle_names = ["i%d" % k for k in range(idle)]
    for name in idle_names:
        maildir(root, name, 1, 1024)
    everyone = [*names, LIGHT, "big", "bigbox", *idle_names]
    write_passwd(os.path.join(root, "passwd-plain"),
                 [passwd_line(u, "{PLAIN}" + password(u)) for u in everyone])
    hashed = [*names, "big", "bigbox", *(idle_names if argon2_idle else [])]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        stored = pool.map(argon2id, [password(u) for u in hashed], chunksize=8)
    write_passwd(os.path.join(root, "passwd-argon2"),
                 [*(passwd_line(u, s) for u, s in zip(hashed, stored, strict=True)),
                  passwd_line(LIGHT, "{PLAIN}" + password(LIGHT))])
    certificate(root)


def recool(root: str, user: str) -> int:
    """Back to a cold Maildir: messages into new/ unflagged, no index.  How many moved."""
    path = os.path.join(root, "mail", user)
    moved = 0
    cur, new = os.path.join(path, "cur"), os.path.join(path, "new")
    for name in os.listdir(cur):
        os.rename(os.path.join(cur, name), os.path.join(new, name.split(":", 1)[0]))
        moved += 1
    for name in os.listdir(path):
        if name in INDEX_FILES or name.startswith("dovecot.index"):
            os.unlink(os.path.join(path, name))
    return moved


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir")
    parser.add_argument("--users", type=int, default=100, help="u0..u<N-1> (default 100)")
    parser.add_argument("--idle", type=int, default=5000, help="i0..i<N-1> (default 5000)")
    parser.add_argument("--bigbox", type=int, default=10000, help="messages in bigbox (default 10000)")
    parser.add_argument("--big-mib", type=int, default=50, help="size of big's message (default 50)")
    parser.add_argument("--argon2-idle", action="store_true", help="the idle users in passwd-argon2 too")
    parser.add_argument("--force", action="store_true", help="make the fixture again")
    parser.add_argument("--recool", metavar="USER", help="make USER's Maildir cold again and exit")
    options = parser.parse_args(argv)
    root = os.path.abspath(options.dir)
    if options.recool:
        recool(root, options.recool)
        return 0
    stamp = os.path.join(root, "fixture.json")
    wanted = {"users": options.users, "idle": options.idle, "bigbox": options.bigbox,
              "big_mib": options.big_mib, "argon2_idle": options.argon2_idle, "version": 2}
    if not options.force and os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == wanted:
                print("fixture %s is there already (--force to make it again)" % root, file=sys.stderr)
                return 0
    build(root, options.users, options.idle, options.bigbox, options.big_mib, options.argon2_idle)
    with open(stamp, "w") as f:
        json.dump(wanted, f)
    print("fixture made in %s" % root, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
