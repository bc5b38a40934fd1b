"""
From a C{pop3://} or C{pop3s://} URL (RFC 2384) to a connected, TLS-protected,
logged-in L{POP3Client}.

TLS is verified by default (L{popservice.client.tls}): the chain against the
platform's trust store (or C{ca_file}) and the name through service_identity
(RFC 6125/7817 rules; an IP address in the URL is matched against the
certificate's IP SANs); a failure of either fails the handshake before
anything is sent.  C{insecure=True} is the only way to skip that.

    client = yield connect(reactor, "pop3s://alice@mail.example.org", Credentials("alice", pw))
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory

from popservice.client.protocol import Credentials, POP3Client, TLSRequiredError
from popservice.client.tls import as_tls_error, tls_options
from popservice.client.tls import is_ip_literal as _is_ip_literal
from popservice.client.url import POP3URL, parse_url

__all__ = ["POP3URL", "connect", "open_connection", "parse_url", "tls_options"]

class _OneClientFactory(ClientFactory):
    """Connect exactly one given protocol instance; C{connected} fires when the TCP connection is up."""

    noisy = False  # no "Starting factory" per connection (the fetch daemon makes many)

    def __init__(self, client: POP3Client) -> None:
        self.client = client
        self.connected: defer.Deferred[None] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> POP3Client:
        if not self.connected.called:
            self.connected.callback(None)
        return self.client

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.connected.called:
            self.connected.errback(reason)


def _connect(reactor: Any, url: POP3URL, tls: Any, timeout: float, client: POP3Client) -> Any:
    """
    Connect C{client}.  An IP literal goes straight to C{connectTCP}/C{connectSSL}
    (no endpoint machinery to import: a one-shot fetch starts faster); a host
    name goes through L{HostnameEndpoint} (RFC 8305 happy eyeballs over A and
    AAAA records).
    """
    if _is_ip_literal(url.host):
        factory = _OneClientFactory(client)
        if url.implicit_tls:
            reactor.connectSSL(url.host, url.port, factory, tls, timeout=timeout)
        else:
            reactor.connectTCP(url.host, url.port, factory, timeout=timeout)
        return factory.connected
    from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS

    endpoint: Any = HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
    if url.implicit_tls:
        endpoint = wrapClientTLS(tls, endpoint)
    return connectProtocol(endpoint, client)


@defer.inlineCallbacks
def open_connection(
    reactor: Any,
    url: POP3URL | str,
    *,
    starttls: str = "required",
    ca_file: str | None = None,
    insecure: bool = False,
    timeout: float = 60.0,
    protocol_factory: type[POP3Client] = POP3Client,
) -> Any:
    """
    Connect, read the greeting and CAPA, and secure the session: implicit
    TLS for C{pop3s}, else STLS when C{starttls} is C{"required"} (fail if
    the server does not offer it) or C{"optional"}; C{"none"} stays plain.
    Fires with the L{POP3Client}, not logged in.
    """
    if isinstance(url, str):
        url = parse_url(url)
    if starttls not in ("required", "optional", "none"):
        raise ValueError(f"starttls must be required, optional or none, not {starttls!r}")
    tls = tls_options(url.host, ca_file, insecure) if url.implicit_tls or starttls != "none" else None
    client = protocol_factory()
    client.timeout = timeout
    yield _connect(reactor, url, tls, timeout, client)
    try:
        yield client.greeting
        if url.implicit_tls:
            client.tls = True
        caps = yield client.capabilities()
        if not url.implicit_tls and starttls != "none":
            if caps.stls:
                # RFC 2595: STLS comes first, whatever else (APOP) the greeting offers
                yield client.starttls(tls)
            elif starttls == "required":
                raise TLSRequiredError(
                    f"{url.host} does not offer STLS (use pop3s://, or allow plaintext explicitly)")
    except BaseException as e:
        client.abort()
        error = as_tls_error(url.host, e)
        if error is e:
            raise
        raise error from e
    return client


@defer.inlineCallbacks
def connect(
    reactor: Any,
    url: POP3URL | str,
    credentials: Credentials | None = None,
    **options: Any,
) -> Any:
    """
    L{open_connection}, then log in with C{credentials} (the URL's user
    name when C{credentials.username} is empty; its C{;AUTH=} restricts the
    mechanisms).  Fires with a logged-in L{POP3Client}.
    """
    if isinstance(url, str):
        url = parse_url(url)
    client = yield open_connection(reactor, url, **options)
    if credentials is not None:
        if not credentials.username and url.user:
            credentials = credentials._replace(username=url.user)
        if credentials.mechanisms is None and url.mechanisms is not None:
            credentials = credentials._replace(mechanisms=url.mechanisms)
        try:
            yield client.login(credentials)
        except BaseException:
            client.abort()
            raise
    return client
