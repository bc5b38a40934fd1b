"""
Message sizes (RFC 1939 LIST and STAT): the size of a message as it is
transmitted, with CRLF line ends, before byte-stuffing (see
L{popservice.wire.transmitted_size}).

A size is computed once, at first sight, and kept in the index; a C{,W=<n>}
in the base name (the size with CRLF line ends, which Dovecot and other
programs write and trust) is used without reading the file, and wins over
the index.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from popservice.stores.maildir.layout import _nofollow_opener
from popservice.wire import transmitted_size

__all__ = ["CHUNK_SIZE", "compute_size"]

#: Chunk size of L{MaildirMessageStream.read} and of size computation.
CHUNK_SIZE = 64 * 1024

_W_RE = re.compile(r",W=([0-9]{1,18})(?=,|\Z)")


def _w_size(base: str) -> int | None:
    """The C{,W=<n>} size (CRLF line ends) recorded in a base name, if any."""
    m = _W_RE.search(base)
    return int(m.group(1)) if m else None


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
