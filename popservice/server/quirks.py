"""
Known client quirks, opt-in with C{--client-quirks}, as Dovecot's
C{pop3_workarounds}; L{popservice.server.transfer} applies them to RETR and
TOP bodies:

  - C{outlook-no-nuls}: NUL bytes are left out of RETR and TOP bodies (some
    Outlook versions stop reading at one).  LIST, STAT and the RETR C{+OK}
    still give the stored size, so they then disagree with what is sent, by
    the number of NULs; Dovecot accepts the same.
  - C{oe-ns-eoh}: a TOP of a message that is all header (no empty line ends
    it) is sent with that empty line added, which Outlook Express and
    Netscape Mail wait for.
"""

from __future__ import annotations

__all__ = ["OE_NS_EOH", "OUTLOOK_NO_NULS", "QUIRKS", "HeaderEnd", "parse_quirks"]

OUTLOOK_NO_NULS = "outlook-no-nuls"
OE_NS_EOH = "oe-ns-eoh"

#: every known quirk, with what it does
QUIRKS: dict[str, str] = {
    OUTLOOK_NO_NULS: "leave NUL bytes out of RETR/TOP bodies (LIST sizes then disagree with what is sent)",
    OE_NS_EOH: "end a TOP of an all-header message with the missing empty line",
}


def parse_quirks(text: str) -> frozenset[str]:
    """C{--client-quirks}: comma-separated names of L{QUIRKS}; C{ValueError} for an unknown one."""
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    unknown = sorted(names - QUIRKS.keys())
    if unknown:
        raise ValueError("unknown client quirk %s (known: %s)"
                         % (", ".join(unknown), ", ".join(sorted(QUIRKS))))
    return frozenset(names)


class HeaderEnd:
    """
    Has the empty line that ends a message's header gone by?  Fed the
    message (or its TOP cut) in chunks of any size; an empty line is LF or
    CRLF alone, as L{popservice.body.TopFilter} counts it.
    """

    __slots__ = ("_tail", "seen")

    def __init__(self) -> None:
        self.seen = False
        # the message starts at a line start, as if after a LF
        self._tail = b"\n"

    def feed(self, data: bytes) -> None:
        if self.seen or not data:
            return
        probe = self._tail + data
        self.seen = b"\n\n" in probe or b"\n\r\n" in probe
        self._tail = probe[-2:]
