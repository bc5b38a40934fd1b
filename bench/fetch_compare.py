#!/usr/bin/env python3
"""
Wall time to fetch N messages (default 1,000 x 20 KiB) from a private Dovecot
into a Maildir: popservice fetch vs mpop vs fetchmail vs getmail6, over
plaintext and implicit TLS, each run with fresh local state (every message is
downloaded every time; nothing is deleted from the server).  On demand, needs
root and Dovecot (see tests/dovecot_fixture.py); prints a table.

    .venv/bin/python bench/fetch_compare.py [--messages 1000] [--size 20480] [--repeats 7]

Runs are interleaved (each repeat runs every tool once), so a load change
hits every tool alike; the table gives medians.

Fairness:
- popservice runs as installed: the `popservice` script beside this Python
  (or `python -c` when there is none), byte-compiled, PYTHONDONTWRITEBYTECODE
  unset.  Start-up is part of its time, as it is of mpop's.
- popservice and mpop both log in with AUTH PLAIN (mpop's config says so; left
  to choose, both would take SCRAM-SHA-256, which costs the server a PBKDF2).
- popservice and mpop make every message durable before recording it (mpop:
  fsync per file; popservice: per batch one syncfs(2), overlapped with the next
  batch's download, then one journal fsync); getmail6 fsyncs its Maildir
  files; fetchmail here delivers through an MDA (`cat > file`) and does not
  fsync at all.
- Result directories are removed only at the end.  On an ext4 without a
  journal (this machine's), creating a file right after many were deleted
  nearby costs 0.3-0.7 ms instead of ~10 us (the allocator skips recently
  deleted inodes, reading each one): deleting each run's tree before the next
  run made file creation dominate every tool's time.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import dovecot_fixture as fx  # noqa: E402

USER = "bulk"
PASSWORD = fx.USERS[USER]


def maildir(path: str) -> str:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    return path


def count(path: str) -> int:
    subs = [os.path.join(path, s) for s in ("cur", "new")]
    return sum(len(os.listdir(d)) for d in subs if os.path.isdir(d))


def run_popservice(work: str, server: fx.Dovecot, tls: bool) -> tuple[list[str], dict[str, str], str]:
    md = os.path.join(work, "Mail")
    url = (f"pop3s://{USER}@127.0.0.1:{server.tls_port}" if tls
           else f"pop3://{USER}@127.0.0.1:{server.port}")
    script = os.path.join(os.path.dirname(sys.executable), "popservice")
    program = ([script] if os.path.exists(script)
               else [sys.executable, "-c", "import sys; from popservice.cli import main; sys.exit(main())"])
    cmd = program + ["fetch", url, "--to", f"maildir:{md}", "--keep", "--auth", "PLAIN",
                     "--state-dir", os.path.join(work, "state"), "-q"]
    cmd += ["--ca-file", server.cert] if tls else ["--starttls", "none", "--allow-plaintext"]
    env = dict(os.environ, POPSERVICE_PASSWORD=PASSWORD, PYTHONPATH=ROOT)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return cmd, env, md


def run_mpop(work: str, server: fx.Dovecot, tls: bool) -> tuple[list[str], dict[str, str], str]:
    md = maildir(os.path.join(work, "Mail"))
    rc = os.path.join(work, "mpoprc")
    with open(rc, "w") as f:
        f.write(f"account bench\nhost 127.0.0.1\nuser {USER}\npassword {PASSWORD}\n"
                f"auth plain\ndelivery maildir {md}\nkeep on\nonly_new off\n"
                f"uidls_file {work}/mpop.uidls\n")
        if tls:
            f.write(f"port {server.tls_port}\ntls on\ntls_starttls off\ntls_trust_file {server.cert}\n")
        else:
            f.write(f"port {server.port}\ntls off\n")
    os.chmod(rc, 0o600)
    return ["mpop", "-C", rc, "-q", "bench"], dict(os.environ), md


def run_fetchmail(work: str, server: fx.Dovecot, tls: bool) -> tuple[list[str], dict[str, str], str]:
    md = maildir(os.path.join(work, "Mail"))
    rc = os.path.join(work, "fetchmailrc")
    port = server.tls_port if tls else server.port
    ssl = f"ssl sslcertfile {server.cert} sslcertck" if tls else "sslproto ''"
    with open(rc, "w") as f:
        # fetchmail checks only DNS names (no IP SANs): connect by name for TLS
        host = "localhost" if tls else "127.0.0.1"
        f.write(f"set no bouncemail\npoll {host} service {port} protocol pop3 uidl auth password\n"
                f"  user '{USER}' password '{PASSWORD}' keep fetchall {ssl}\n"
                f"  mda 'cat > {md}/new/$$.%s'\n" % "$(date +%s%N)")
    os.chmod(rc, 0o600)
    env = dict(os.environ, FETCHMAILHOME=work)
    return (["fetchmail", "-f", rc, "--nodetach", "--invisible", "-s", "--pidfile",
             os.path.join(work, "fm.pid")], env, md)


def run_getmail(work: str, server: fx.Dovecot, tls: bool) -> tuple[list[str], dict[str, str], str]:
    md = maildir(os.path.join(work, "Mail"))
    os.chmod(work, 0o777)
    for dp, _dns, _fns in os.walk(md):
        os.chmod(dp, 0o777)
    rc = os.path.join(work, "getmailrc")
    with open(rc, "w") as f:
        f.write("[retriever]\n")
        if tls:
            f.write(f"type = SimplePOP3SSLRetriever\nport = {server.tls_port}\n"
                    f"ca_certs = {server.cert}\n")
        else:
            f.write(f"type = SimplePOP3Retriever\nport = {server.port}\n")
        f.write(f"server = 127.0.0.1\nusername = {USER}\npassword = {PASSWORD}\n\n"
                f"[destination]\ntype = Maildir\npath = {md}/\nuser = nobody\n\n"
                "[options]\nread_all = true\ndelete = false\nverbose = 0\n")
    return (["getmail", "--rcfile", rc, "--getmaildir", work], dict(os.environ), md)


TOOLS = {"popservice": run_popservice, "mpop": run_mpop, "fetchmail": run_fetchmail, "getmail6": run_getmail}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=20 * 1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tools", default=",".join(TOOLS))
    args = ap.parse_args()
    reason = fx.skip_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    server = fx.get_dovecot()
    server.set_mailbox(USER, PASSWORD, fx.bulk_messages(USER, args.messages, args.size))
    tools = [t for t in args.tools.split(",") if t]
    results: dict[tuple[str, str], list[float]] = {}
    compileall.compile_dir(os.path.join(ROOT, "popservice"), quiet=1)  # as pip install does
    root = tempfile.mkdtemp(prefix="bench-fetch-")  # removed at the end (see the module docstring)
    os.chmod(root, 0o755)  # getmail6 delivers as nobody
    # warm Dovecot's index and the page cache once
    warm = tempfile.mkdtemp(prefix="warm-", dir=root)
    cmd, env, _ = run_mpop(warm, server, False)
    subprocess.run(cmd, env=env, check=False, cwd=warm)
    for _rep in range(args.repeats):
        for mode in ("plain", "tls"):
            for tool in tools:  # interleaved so load changes hit every tool alike
                if shutil.which({"popservice": "true", "getmail6": "getmail"}.get(tool, tool)) is None:
                    continue
                work = tempfile.mkdtemp(prefix=f"{tool}-", dir=root)
                cmd, env, md = TOOLS[tool](work, server, mode == "tls")
                t0 = time.monotonic()
                p = subprocess.run(cmd, env=env, cwd=work, capture_output=True, timeout=600)
                elapsed = time.monotonic() - t0
                n = count(md)
                if p.returncode not in (0, 1) or n != args.messages:
                    print(f"{tool} {mode}: rc={p.returncode}, {n} messages; "
                          f"{p.stderr.decode(errors='replace')[-300:]}", file=sys.stderr)
                    continue
                results.setdefault((tool, mode), []).append(elapsed)
    shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.messages} x {args.size} B from Dovecot into a Maildir, median of {args.repeats} "
          "(wall seconds; ratio to mpop)")
    print(f"{'tool':<12} {'plain':>8} {'ratio':>6} {'tls':>8} {'ratio':>6}")
    for tool in tools:
        row = f"{tool:<12}"
        for mode in ("plain", "tls"):
            times = results.get((tool, mode))
            ref = results.get(("mpop", mode))
            if not times:
                row += f" {'-':>8} {'':>6}"
                continue
            med = statistics.median(times)
            ratio = f"{med / statistics.median(ref):.2f}" if ref else ""
            row += f" {med:8.3f} {ratio:>6}"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
