"""
Where a streamed message body goes: a L{Consumer} (a plain callable taking
chunks, or a Twisted IConsumer), how one is turned into a write function,
and L{CRLFToLF}, which converts line ends across chunk boundaries.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, Union

from twisted.internet.interfaces import IConsumer

from popservice import wire

__all__ = ["CRLFToLF", "Consumer", "PLAIN_CALLABLES", "as_writer"]


#: A message sink: a callable taking chunks, or a Twisted IConsumer.
Consumer = Union[Callable[[bytes], object], IConsumer]


class CRLFToLF:
    """Convert CRLF to LF in a chunked stream (a CR split from its LF is held back)."""

    def __init__(self) -> None:
        self._held = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held:
            chunk = b"\r" + chunk
            self._held = False
        if chunk.endswith(b"\r"):
            self._held = True
            chunk = chunk[:-1]
        return wire.crlf_to_lf(chunk)

    def finish(self) -> bytes:
        if self._held:
            self._held = False
            return b"\r"
        return b""


#: sink types that are never IConsumers: plain functions and bound methods
PLAIN_CALLABLES = (types.BuiltinMethodType, types.MethodType, types.FunctionType)


def as_writer(consumer: Consumer) -> Callable[[bytes], object]:
    """The function that takes C{consumer}'s chunks (an IConsumer's C{write})."""
    if IConsumer.providedBy(consumer):
        c: Any = consumer
        return c.write  # type: ignore[no-any-return]
    assert callable(consumer)
    return consumer

