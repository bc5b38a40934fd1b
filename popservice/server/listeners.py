"""
Which listener a connection came through, for logs and metrics.

One L{popservice.server.factory.POP3ServerFactory} serves every C{--listen}
endpoint; each endpoint gets a L{ListenerFactory} in front of it that names
the protocols it builds (C{tcp:110}, C{ssl:995}).  Names come from the
configuration only, so they make a small fixed set of metric labels.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocolFactory
from twisted.internet.protocol import Protocol
from zope.interface import implementer

#: endpoint strings escape colons (and backslashes) with a backslash
_SEPARATOR = re.compile(r"(?<!\\):")


def _fields(description: str) -> list[str]:
    return [f.replace("\\:", ":") for f in _SEPARATOR.split(description)]


def listener_name(description: str) -> str:
    """
    A short name for a C{--listen} endpoint string: its kind and port
    (C{tcp:110}, C{ssl:995}, C{tcp6:110}), C{unix:PATH}, C{systemd:INDEX},
    or just the kind.
    """
    fields = _fields(description)
    kind = fields[0].lower() if fields else ""
    positional = [f for f in fields[1:] if "=" not in f]
    named = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    if kind in ("tcp", "tcp6", "ssl"):
        port = named.get("port") or (positional[0] if positional else "")
        return "%s:%s" % (kind, port)
    if kind == "unix":
        return "unix:%s" % (named.get("address") or (positional[0] if positional else ""),)
    if kind == "systemd":
        return "systemd:%s" % (named.get("index") or named.get("name") or "",)
    return kind or "default"


@implementer(IProtocolFactory)
class ListenerFactory:
    """
    Builds the shared factory's protocols and names their listener
    (C{protocol.listener}).  Starting and stopping pass through, so the
    shared factory still sees every port (it ends its sessions when the last
    one stops); other attributes, read or set, are the shared factory's.
    """

    def __init__(self, factory: Any, name: str) -> None:
        self.factory = factory
        self.name = name

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        protocol: Any = self.factory.buildProtocol(addr)
        if protocol is not None:
            protocol.listener = self.name
        return protocol  # type: ignore[no-any-return]

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def logPrefix(self) -> str:
        return str(self.factory.logPrefix())

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found here: the shared factory's (connections, config...).
        if name == "factory":
            raise AttributeError(name)
        return getattr(self.factory, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Setting one of the shared factory's attributes (its observer, say) sets it there.
        if name in ("factory", "name"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.factory, name, value)

    def __repr__(self) -> str:
        return "<ListenerFactory %s of %r>" % (self.name, self.factory)
