"""
Message numbering (RFC 1939 section 7: message numbers are fixed for the
session): oldest first, by the integer delivery time stamp that starts a
Maildir base name, ties and non-numeric names by base name.

The same order is the line order of the C{popservice-uidlist} index, so
sorting it again at the next login is cheap.
"""

from __future__ import annotations

import operator
import re

__all__ = ["message_sort_key"]

_DIGITS_RE = re.compile(r"[0-9]+\Z")


def message_sort_key(base: str) -> "tuple[int, int, str]":
    """
    Oldest first: by the integer time stamp before the first C{.}, ties by the
    base name; names without a numeric time stamp after all others, by name.
    """
    head = base.split(".", 1)[0]
    if _DIGITS_RE.match(head):
        return (0, int(head), base)
    return (1, 0, base)


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
