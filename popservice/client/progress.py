"""
The fetch's progress bar: messages, megabytes and an ETA on a terminal
(standard error by default), nothing when not enabled.  Both fetch engines
advance it through L{popservice.client.delivery.DeliverySession}.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Progress"]


class Progress:
    """Messages and bytes with ETA on a terminal; nothing otherwise."""

    def __init__(self, stream: Any = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total_msgs = 0
        self.total_bytes = 0
        self.msgs = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._last = 0.0

    def begin(self, msgs: int, nbytes: int) -> None:
        self.total_msgs, self.total_bytes = msgs, nbytes
        self.start = time.monotonic()

    def advance(self, nbytes: int, force: bool = False) -> None:
        self.msgs += 1
        self.bytes += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1 and self.msgs < self.total_msgs:
            return
        self._last = now
        elapsed = now - self.start
        frac = self.bytes / self.total_bytes if self.total_bytes else 1.0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        width = 30
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        self.stream.write(f"\r[{bar}] {self.msgs}/{self.total_msgs} msgs "
                          f"{self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB ETA {eta:4.0f}s ")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.total_msgs:
            self.stream.write("\n")
            self.stream.flush()
