"""
C{popservice probe}: connect (verified TLS first, then without checks if
that fails) and print what a POP3 server offers: greeting, APOP, TLS and its
certificate, CAPA before and after STLS, login mechanisms.  Runs on Twisted,
imported when it runs.
"""

from __future__ import annotations

import sys

from popservice.client.cli_common import EX_OK, connection_kwargs, describe_failure, run_reactor
from popservice.client.url import parse_url

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from popservice.client.protocol import Capabilities, POP3Client

__all__ = ["probe", "run_probe"]


def _cert_lines(client: POP3Client) -> list[str]:
    t: Any = client.transport
    get = getattr(t, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return ["  (no certificate)"]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    c = cert.to_cryptography()
    lines = [f"  subject: {c.subject.rfc4514_string()}", f"  issuer:  {c.issuer.rfc4514_string()}",
             f"  valid:   {c.not_valid_before_utc:%Y-%m-%d} .. {c.not_valid_after_utc:%Y-%m-%d}"]
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in san]
        lines.append(f"  names:   {', '.join(names)}")
    except x509.ExtensionNotFound:
        pass
    lines.append(f"  sha256:  {c.fingerprint(hashes.SHA256()).hex(':')}")
    return lines


def _capa_lines(caps: Capabilities | None) -> list[str]:
    if caps is None or not caps.lines:
        return ["  (CAPA not supported)"]
    return ["  " + line for line in caps.lines]


def probe(reactor: Any, args: argparse.Namespace, out: Any) -> Any:
    """
    Probe C{args.url} and write the report to C{out}; a Deferred firing
    with the exit status.  (L{run_probe} runs it on the global reactor.)
    """
    from twisted.internet import defer
    from twisted.python.failure import Failure

    from popservice.client.connect import open_connection
    from popservice.client.protocol import POP3Error

    url = parse_url(args.url)

    @defer.inlineCallbacks
    def main() -> Any:
        opts = connection_kwargs(args)
        verified = True
        try:
            client = yield open_connection(reactor, url, **opts)
        except POP3Error:
            raise
        except Exception as e:
            if args.insecure:
                raise
            text, _ = describe_failure(Failure(e))
            out.write(f"verified connection failed: {text}\nretrying without certificate checks\n")
            verified = False
            opts["insecure"] = True
            client = yield open_connection(reactor, url, **opts)
        greeting = client.greeting_response
        out.write(f"server:    {url}\n")
        out.write(f"greeting:  {'+OK' if greeting and greeting.ok else '-ERR'} "
                  f"{greeting.text if greeting else ''}\n")
        stamp = client.apop_timestamp
        out.write(f"APOP:      {'timestamp ' + stamp.decode() if stamp else 'no'}\n")
        if url.implicit_tls:
            out.write("TLS:       implicit (pop3s)\n")
        elif client.tls:
            out.write("TLS:       STLS\nCAPA before STLS:\n")
            out.write("\n".join(_capa_lines(client.capa_before_tls)) + "\n")
        else:
            out.write("TLS:       none (STLS not offered or disabled)\n")
        if client.tls:
            state = "verified" if verified and not args.insecure else "NOT VERIFIED"
            out.write(f"certificate ({state}):\n" + "\n".join(_cert_lines(client)) + "\n")
        caps = client.capa
        out.write("CAPA after STLS:\n" if client.tls and not url.implicit_tls else "CAPA:\n")
        out.write("\n".join(_capa_lines(caps)) + "\n")
        if caps is not None:
            out.write(f"mechanisms: {' '.join(caps.sasl) or '(no SASL)'}"
                      f"{' +USER' if caps.user else ''}{' +APOP' if client.apop_timestamp else ''}\n")
            if caps.login_delay is not None:
                out.write(f"LOGIN-DELAY: {caps.login_delay} s\n")
            if caps.expire is not None:
                out.write(f"EXPIRE: {caps.expire}{' days' if isinstance(caps.expire, int) else ''}\n")
            out.write(f"pipelining: {'yes' if caps.pipelining else 'no'}\n")
        try:
            yield client.quit()
        except Exception:  # noqa: S110
            pass
        return EX_OK

    return main()


def run_probe(args: argparse.Namespace) -> int:
    """The C{probe} subcommand's handler: an exit status."""
    parse_url(args.url)  # a bad URL is a usage error, before any reactor runs
    return run_reactor(lambda reactor: probe(reactor, args, sys.stdout))
