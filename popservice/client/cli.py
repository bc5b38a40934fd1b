"""
The client subcommands of C{popservice}: C{fetch}, C{probe}, C{migrate}.

    popservice fetch pop3s://alice@mail.example.org --to maildir:~/Mail
    popservice probe pop3://mail.example.org
    popservice migrate pop3s://alice@old.example.org --to maildir:/srv/mail/alice

C{add_subcommands(subparsers)} registers them on an argparse subparsers
object; each sets C{handler} (a function taking the parsed namespace and
returning an exit status).  C{python -m popservice.client.cli} runs them alone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Sequence

# The default fetch path (the blocking engine) must not import Twisted: it
# costs about as much start-up time as a whole fetch.  Twisted is imported
# inside the functions that need it (probe, migrate, fetch --engine twisted).
from popservice.client import blocking
from popservice.client.blocking import Credentials
from popservice.client.delivery import (
    DeliveryError,
    FetchOptions,
    Progress,
    StateLocked,
    make_target,
)
from popservice.client.url import POP3URL, parse_url

TYPE_CHECKING = False  # (typing is not imported at run time: it costs start-up; see popservice.value)
if TYPE_CHECKING:
    from typing import Any

    from twisted.internet import defer

    from popservice.client.protocol import Capabilities, POP3Client

__all__ = ["add_subcommands", "main", "EX_OK", "EX_TEMPFAIL"]

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2
#: sysexits.h: try again later (IN-USE, SYS/TEMP, network)
EX_TEMPFAIL = 75


# --------------------------------------------------------------------------
# Arguments

def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]


def _connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="pop3://[user[;AUTH=mech]@]host[:port] or pop3s://... (RFC 2384)")
    p.add_argument("--ca-file", metavar="PEM", help="trust only the CA certificate(s) in this PEM file")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server certificate (dangerous)")
    p.add_argument("--starttls", choices=("required", "optional", "none"), default="required",
                   help="for pop3:// URLs: STLS is required (default), used when offered "
                        "(optional, open to downgrade), or never used (none)")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")


def _login_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", help="login name (default: from the URL, else the local user)")
    p.add_argument("--auth", metavar="MECH", action="append",
                   help="allowed login method(s): SCRAM-SHA-256, CRAM-MD5, PLAIN, LOGIN, "
                        "XOAUTH2, OAUTHBEARER, APOP, USER (default: the strongest offered)")
    p.add_argument("--password-env", metavar="VAR", default="POPSERVICE_PASSWORD",
                   help="take the password from this environment variable (default %(default)s)")
    p.add_argument("--password-command", metavar="CMD",
                   help="run CMD (through the shell); its first output line is the password")
    p.add_argument("--netrc", nargs="?", const="", metavar="FILE",
                   help="look the password up in ~/.netrc (or FILE)")
    p.add_argument("--oauth-token-command", metavar="CMD",
                   help="run CMD for an OAuth 2.0 access token (XOAUTH2/OAUTHBEARER)")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="allow sending the password in clear without TLS (with --starttls none)")


def _add_fetch(sub: Any) -> None:
    p = sub.add_parser("fetch", help="download new mail (crash-safe, exactly once)",
                       description="Download mail from a POP3 server into a Maildir, mbox or MDA.")
    _connection_options(p)
    _login_options(p)
    p.add_argument("--to", required=True, metavar="TARGET",
                   help="maildir:PATH, mbox:PATH or mda:COMMAND (%%u = user name)")
    p.add_argument("--keep", action="store_true",
                   help="leave messages on the server (later runs fetch only new ones)")
    p.add_argument("--limit", type=int, metavar="N", help="fetch at most N messages")
    p.add_argument("--max-size", type=_size, metavar="SIZE", help="skip messages larger than SIZE")
    p.add_argument("--crlf", action="store_true", help="store CRLF line ends (default: LF)")
    p.add_argument("--state-dir", metavar="DIR", help="journal directory for this account "
                   "(default: $XDG_STATE_HOME/popservice/fetch/USER@HOST:PORT)")
    p.add_argument("--window", type=int, default=32, help="pipelined RETRs in flight")
    p.add_argument("--batch", type=int, default=256, metavar="N",
                   help="messages made durable together (one sync and journal write per batch)")
    p.add_argument("--sync", choices=("batch", "file"), default="batch",
                   help="maildir: make a batch durable with one syncfs(2) (batch, the default on "
                   "Linux; it also waits for other programs' writes to that filesystem) or with "
                   "an fdatasync per file (file)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.add_argument("--progress", action="store_true", help="show progress even when not on a TTY")
    p.add_argument("--engine", choices=("blocking", "twisted"), default="blocking",
                   help="the stdlib blocking engine (default: starts fast) or the Twisted one")
    p.set_defaults(handler=run_fetch)


def _add_probe(sub: Any) -> None:
    p = sub.add_parser("probe", help="show what a POP3 server offers",
                       description="Greeting, CAPA before and after STLS, certificate, mechanisms.")
    _connection_options(p)
    p.set_defaults(handler=run_probe, starttls="optional")


def _add_migrate(sub: Any) -> None:
    p = sub.add_parser("migrate", help="copy a mailbox into a popservice Maildir, keeping its UIDLs",
                       description="Copy every message of a POP3 mailbox into a Maildir served by "
                                   "popservice; the old server's UIDLs are kept so clients do not "
                                   "download everything again.")
    _connection_options(p)
    _login_options(p)
    p.add_argument("--to", required=True, metavar="maildir:PATH")
    p.add_argument("--delete", action="store_true", help="delete from the old server afterwards")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(handler=run_migrate)


_SUBCOMMANDS = {"fetch": _add_fetch, "probe": _add_probe, "migrate": _add_migrate}


def add_subcommands(subparsers: Any, only: str | None = None) -> None:
    """
    Register C{fetch}, C{probe} and C{migrate} on an argparse subparsers
    object; C{only}: just that one (the command being run: argparse spends
    milliseconds on every option, and a fetch should not wait for the others').
    """
    for name, add in _SUBCOMMANDS.items():
        if only is None or name == only:
            add(subparsers)


# --------------------------------------------------------------------------
# Secrets

# getpass, netrc and subprocess are imported where used: most runs need none of them.

def _command_output(cmd: str) -> str:
    import subprocess

    out = subprocess.run(cmd, shell=True, check=True, stdout=subprocess.PIPE).stdout  # noqa: S602
    return out.decode("utf-8").splitlines()[0] if out else ""


def resolve_credentials(args: argparse.Namespace, url: POP3URL) -> Credentials:
    """User name and password/token from the options, the environment, netrc or a prompt."""
    username = args.user or url.user
    if not username:
        import getpass

        username = getpass.getuser()
    password: str | None = None
    token: str | None = None
    if args.oauth_token_command:
        token = _command_output(args.oauth_token_command)
    elif args.password_command:
        password = _command_output(args.password_command)
    elif args.password_env and args.password_env in os.environ:
        password = os.environ[args.password_env]
    elif args.netrc is not None:
        import netrc

        try:
            entry = netrc.netrc(args.netrc or None).authenticators(url.host)
        except (OSError, netrc.NetrcParseError) as e:
            raise SystemExit(f"popservice: netrc: {e}")
        if entry is None:
            raise SystemExit(f"popservice: no netrc entry for {url.host}")
        if entry[0] and not (args.user or url.user):
            username = entry[0]
        password = entry[2]
    elif sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"Password for {username}@{url.host}: ")
    else:
        raise SystemExit("popservice: no password: use --password-env, --password-command, "
                         "--netrc or a terminal")
    mechs = tuple(m.upper() for m in args.auth) if args.auth else url.mechanisms
    return Credentials(username, password, token, mechanisms=mechs,
                       allow_plaintext=args.allow_plaintext or args.starttls == "none")


def default_state_dir(url: POP3URL, username: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    name = re.sub(r"[^A-Za-z0-9@._:+-]", "_", f"{username}@{url.host}:{url.port}")
    return os.path.join(base, "popservice", "fetch", name)


# --------------------------------------------------------------------------
# Running

def _describe_error(e: BaseException) -> tuple[str, int]:
    """A message and an exit status for an error of either engine."""
    if isinstance(e, blocking.POP3Error):
        return str(e), EX_TEMPFAIL if e.temporary else EX_FAIL
    if isinstance(e, blocking.TLSError):
        return f"TLS: {e}", EX_FAIL
    if isinstance(e, StateLocked):
        return str(e), EX_TEMPFAIL
    if isinstance(e, (blocking.POP3ClientError, DeliveryError)):
        return str(e), EX_FAIL
    if "twisted" in sys.modules:
        from twisted.internet.error import ConnectError, ConnectionLost, TimeoutError

        from popservice.client.protocol import POP3ClientError, POP3Error

        if isinstance(e, POP3Error):
            return str(e), EX_TEMPFAIL if e.temporary else EX_FAIL
        if isinstance(e, (ConnectError, ConnectionLost, TimeoutError)):
            return f"network: {e}", EX_TEMPFAIL
        if isinstance(e, POP3ClientError):
            return str(e), EX_FAIL
    if isinstance(e, OSError):
        return f"network: {e}", EX_TEMPFAIL
    if isinstance(e, ValueError):
        return str(e), EX_FAIL
    if type(e).__module__.startswith("OpenSSL"):
        return f"TLS: {e}", EX_FAIL
    return f"{type(e).__name__}: {e}", EX_FAIL


def _describe_failure(f: Any) -> tuple[str, int]:
    """L{_describe_error} for a Twisted Failure."""
    return _describe_error(f.value)


def _close_target(target: Any) -> None:
    """Close the descriptor a target may hold (the mbox file)."""
    fd = getattr(target, "fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)


def run_reactor(main: Callable[[Any], defer.Deferred[int]]) -> int:
    """Run C{main(reactor)} to completion on the global reactor; its int is the exit status."""
    from twisted.internet import defer
    from twisted.internet import reactor as _reactor
    from twisted.python.failure import Failure

    reactor: Any = _reactor
    status: list[int] = []

    def go() -> None:
        d = defer.maybeDeferred(main, reactor)

        def ok(code: int) -> None:
            status.append(code)

        def failed(f: Failure) -> None:
            text, code = _describe_failure(f)
            sys.stderr.write(f"popservice: {text}\n")
            status.append(code)

        d.addCallbacks(ok, failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    return status[0] if status else EX_FAIL


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"starttls": args.starttls, "ca_file": args.ca_file, "insecure": args.insecure,
            "timeout": args.timeout}


def run_fetch(args: argparse.Namespace) -> int:
    url = parse_url(args.url)
    creds = resolve_credentials(args, url)
    state_dir = (os.path.expanduser(args.state_dir) if args.state_dir
                 else default_state_dir(url, creds.username))
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    warnings: list[str] = []
    # our tmp/ files' mark (zlib, not hashlib: hashlib costs OpenSSL's start-up)
    tag = "%08x" % zlib.crc32(state_dir.encode())
    target = make_target(args.to, username=creds.username, state_dir=state_dir, crlf=args.crlf,
                         warn=warnings.append, tag=tag, sync=args.sync)
    progress = Progress(enabled=(args.progress or sys.stderr.isatty()) and not args.quiet)
    options = FetchOptions(keep=args.keep, limit=args.limit, max_size=args.max_size, window=args.window,
                           batch_messages=max(1, args.batch))

    def report(result: Any) -> int:
        for w in warnings + result.warnings:
            sys.stderr.write(f"popservice: warning: {w}\n")
        if not args.quiet:
            sys.stderr.write(result.summary() + "\n")
        return EX_OK

    if getattr(args, "engine", "blocking") == "twisted":
        return _run_fetch_twisted(args, creds, target, state_dir, options, progress, report)
    options.early_writeback = False  # measured faster for this engine (see FetchOptions)
    options.threaded_sync = True  # measured faster for this engine: one syncfs per batch, overlapped
    # What exists now (modules, classes) lives as long as the process: keep
    # the collector from walking it again and again while messages stream.
    gc.freeze()
    try:
        try:
            result = blocking.run_fetch(url, creds, target, state_dir, options, progress,
                                        **_options(args))
        except Exception as e:
            text, code = _describe_error(e)
            sys.stderr.write(f"popservice: {text}\n")
            return code
        return report(result)
    finally:
        _close_target(target)


def _run_fetch_twisted(args: argparse.Namespace, creds: Credentials, target: Any, state_dir: str,
                       options: FetchOptions, progress: Progress,
                       report: Callable[[Any], int]) -> int:
    from twisted.internet import defer

    from popservice.client.connect import connect
    from popservice.client.fetch import fetch

    url = parse_url(args.url)

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        client = yield connect(reactor, url, creds, **_options(args))
        result = yield fetch(client, target, state_dir, options, progress)
        return report(result)

    try:
        return run_reactor(main)
    finally:
        _close_target(target)


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


def run_probe(args: argparse.Namespace) -> int:
    from twisted.internet import defer
    from twisted.python.failure import Failure

    from popservice.client.connect import open_connection
    from popservice.client.protocol import POP3Error

    url = parse_url(args.url)
    out = sys.stdout

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        opts = _options(args)
        verified = True
        try:
            client = yield open_connection(reactor, url, **opts)
        except POP3Error:
            raise
        except Exception as e:
            if args.insecure:
                raise
            text, _ = _describe_failure(Failure(e))
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

    return run_reactor(main)


# --------------------------------------------------------------------------
# migrate

def _write_popservice_index(path: str, entries: list[tuple[str, int, str]]) -> None:
    """
    Add C{(uidl, size, base name)} entries to the Maildir's C{popservice-uidlist}
    (the format of popservice.stores.maildir), atomically, holding the store's
    C{popservice-uidlist.lock} (a blocking flock, held only for the rewrite) so
    a popservice server scanning the same Maildir never loses either update.
    """
    from popservice.stores import maildir as store

    with store._index_lock(path):
        text = store._read_text(os.path.join(path, store.INDEX_FILE_NAME))
        index = store.parse_index(text) if text is not None else None
        if index is None:
            index = store._Index(store._fresh_uidvalidity(), 1)
        for uidl, size, base in entries:
            index.entries[base] = (uidl, size)
        store._write_index(path, index)


def run_migrate(args: argparse.Namespace) -> int:
    from twisted.internet import defer

    from popservice.client.connect import connect

    url = parse_url(args.url)
    creds = resolve_credentials(args, parse_url(args.url))
    kind, _, path = args.to.partition(":")
    if kind != "maildir" or not path:
        raise SystemExit("popservice: migrate needs --to maildir:PATH")
    path = os.path.abspath(os.path.expanduser(path))
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        from popservice.client.delivery import fsync_dir

        client = yield connect(reactor, url, creds, **_options(args))
        uidls = yield client.uidl()
        sizes = {e.number: e.size for e in (yield client.list())}
        # keep UIDLs the target already knows (a rerun after a crash copies nothing twice)
        known: set[str] = set()
        try:
            with open(os.path.join(path, "popservice-uidlist"), encoding="utf-8") as f:
                known = {line.split(" ", 1)[0] for line in f.read().split("\n")[1:] if line}
        except FileNotFoundError:
            pass
        entries: list[tuple[str, int, str]] = []
        base_ts = int(time.time())
        total = 0
        for i, e in enumerate(uidls):
            if e.uid in known:
                continue
            # POP3 order = delivery order: keep it with increasing time stamps
            base = f"{base_ts}.M{i:06d}P{os.getpid()}.migrated,W={sizes.get(e.number, 0)}"
            tmp = os.path.join(path, "tmp", base)
            with open(tmp, "wb") as f:
                yield client.retrieve(e.number, f.write, crlf=False)
                f.flush()
                os.fsync(f.fileno())
                total += f.tell()
            os.rename(tmp, os.path.join(path, "cur", base + ":2,"))
            entries.append((e.uid, sizes.get(e.number, 0), base))
        fsync_dir(os.path.join(path, "cur"))
        if entries:
            _write_popservice_index(path, entries)
        if args.delete:
            for e in uidls:
                yield client.delete(e.number)
        yield client.quit()
        if not args.quiet:
            sys.stderr.write(f"migrated {len(entries)} messages ({total} bytes) into {path}, "
                             f"{len(uidls) - len(entries)} already there; UIDLs kept\n")
        return EX_OK

    return run_reactor(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="popservice")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    add_subcommands(sub, only=argv[0] if argv and argv[0] in _SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ValueError, DeliveryError, StateLocked) as e:
        sys.stderr.write(f"popservice: {e}\n")
        return EX_TEMPFAIL if isinstance(e, StateLocked) else EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
