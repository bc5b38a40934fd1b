"""
The C{popservice} command.

    popservice demo [--dir DIR] [--port 1110] [--tls-port 1995]
        Create a demo world on first run (Maildir, demo user, self-signed
        certificate), print how to connect, and run the server in the foreground.
    popservice fetch | probe | migrate ...
        The POP3 client tools (see popservice.client.cli).
    popservice db upgrade|status URL, popservice migrate-store maildir:T postgresql://...
        The PostgreSQL store (see popservice.dbadmin).
    popservice deliver USER [--mail maildir:TEMPLATE] [--passwd FILE]
        Store a message from stdin in USER's mailbox, for an MTA's mailbox
        command (see popservice.delivery.deliver; sysexits exit codes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

DEMO_MESSAGES = [
    b"From: Welcome <welcome@popservice.invalid>\nTo: demo@localhost\nSubject: Welcome to popservice\n"
    b"Message-ID: <welcome.1@popservice.invalid>\n\nThis is the first demo message.\n"
    b".A line starting with a dot survives byte-stuffing.\n",
    b"From: Welcome <welcome@popservice.invalid>\nTo: demo@localhost\nSubject: Second message\n"
    b"Message-ID: <welcome.2@popservice.invalid>\nContent-Type: text/plain; charset=utf-8\n\n"
    + "Grüße aus Köln.\n".encode(),
    b"From: Welcome <welcome@popservice.invalid>\nTo: demo@localhost\nSubject: Third message\n"
    b"Message-ID: <welcome.3@popservice.invalid>\n\nNo trailing newline here",
]


def create_demo(directory: str) -> str:
    """Create the demo world in C{directory} if missing; return the demo password."""
    from popservice.tlsutil import make_self_signed

    os.makedirs(directory, mode=0o700, exist_ok=True)
    passwd = os.path.join(directory, "passwd")
    if not os.path.exists(passwd):
        import secrets

        password = secrets.token_urlsafe(12)
        fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("demo:{PLAIN}%s:::::\n" % (password,))
        maildir = os.path.join(directory, "mail", "demo")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
        now = int(time.time())
        for i, message in enumerate(DEMO_MESSAGES):
            name = "%d.M%dP%d.demo" % (now - 60 * (len(DEMO_MESSAGES) - i), i, os.getpid())
            with open(os.path.join(maildir, "new", name), "wb") as f:
                f.write(message)
    if not os.path.exists(os.path.join(directory, "tls", "cert.pem")):
        make_self_signed(os.path.join(directory, "tls"))
    with open(passwd) as f:
        return f.readline().split(":")[1].removeprefix("{PLAIN}")


def demo(args: argparse.Namespace) -> int:
    from twisted.scripts.twistd import run

    directory = os.path.abspath(args.dir)
    password = create_demo(directory)
    tls = os.path.join(directory, "tls")
    print("popservice demo server (data in %s)" % (directory,))
    print("  user: demo   password: %s" % (password,))
    print("  pop3://127.0.0.1:%d  (STLS offered)   pop3s://127.0.0.1:%d" % (args.port, args.tls_port))
    print("  try:  curl --ssl-reqd --cacert %s/cert.pem pop3://demo:%s@127.0.0.1:%d/1"
          % (tls, password, args.port))
    print("  stop with Ctrl-C", flush=True)
    sys.argv = [
        "twistd", "--nodaemon", "--pidfile=", "pop3",
        "--mail", "maildir:%s/mail/%%u" % (directory,),
        "--auth", "passwd-file:%s/passwd" % (directory,),
        "--listen", "tcp:%d:interface=127.0.0.1" % (args.port,),
        "--listen", "ssl:%d:privateKey=%s/key.pem:certKey=%s/cert.pem:interface=127.0.0.1"
        % (args.tls_port, tls, tls),
        "--tls-certificate", tls + "/cert.pem", "--tls-key", tls + "/key.pem",
    ]
    run()
    return 0


#: Subcommands of the client; a fetch must not pay for importing the server side.
CLIENT_COMMANDS = ("fetch", "probe", "migrate")


def add_deliver_subcommand(subparsers: Any) -> None:
    """C{popservice deliver}: run by an MTA once per message, so it loads nothing else."""
    from popservice.delivery import deliver

    p = subparsers.add_parser("deliver", help="store a message from stdin in a user's mailbox "
                              "(an MTA's mailbox command)", description=deliver.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("user", help="the mailbox user")
    p.add_argument("--mail", default="maildir:~/Maildir",
                   help="mail store, as twistd pop3 --mail (default maildir:~/Maildir)")
    p.add_argument("--passwd", default=None,
                   help="passwd-file giving users and their homes for ~ (default: the system's accounts)")
    p.add_argument("--max-size", type=int, default=deliver.DEFAULT_MAX_SIZE,
                   help="refuse larger messages with exit code 65 (default 50 MiB)")
    p.set_defaults(func=deliver.run_command)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="popservice", description="POP3 server and client tools")
    sub = parser.add_subparsers(dest="command", required=True)
    if argv[:1] == ["deliver"]:
        add_deliver_subcommand(sub)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    from popservice.client import cli as client_cli

    client_only = bool(argv) and argv[0] in CLIENT_COMMANDS
    if not client_only:
        p = sub.add_parser("demo", help="run a demo server with a demo user and self-signed certificate")
        p.add_argument("--dir", default="popservice-demo", help="data directory (created on first run)")
        p.add_argument("--port", type=int, default=1110, help="plaintext/STLS port (default 1110)")
        p.add_argument("--tls-port", type=int, default=1995, help="implicit TLS port (default 1995)")
        p.set_defaults(func=demo)
    client_cli.add_subcommands(sub, only=argv[0] if client_only else None)
    if not client_only:
        from popservice import admin, dbadmin, expire

        admin.add_subcommands(sub)
        expire.add_subcommands(sub)
        dbadmin.add_subcommands(sub)
        add_deliver_subcommand(sub)
    args = parser.parse_args(argv)
    run_command = getattr(args, "func", None) or args.handler
    return int(run_command(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
