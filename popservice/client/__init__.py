"""
popservice.client: the POP3 client and C{popservice fetch/probe/migrate}.

Shared by both engines (no Twisted):
    common        errors, credentials, choosing a login, LIST/UIDL parsing
    url           pop3:// and pop3s:// URLs (RFC 2384)
    delivery      the crash-safe fetch: DeliverySession, FetchOptions, FetchResult
    journal       the per-account journal of delivered UIDLs, and its lock
    targets       the Maildir, mbox and MDA delivery targets
    forward       the LMTP and SMTP forwarding target (smtplib, loaded only for it)
    accounts      the accounts of a config file (TOML); one account's fetch, prepared and told
    durability    syncfs, sync_file_range, fsync of a directory
    progress      the progress bar

The blocking engine (the default for fetch; stdlib only):
    blocking      socket/ssl client and the pipelined fetch loop

The Twisted engine:
    protocol      POP3Client: the commands, with a Deferred API
    pipeline      its base: the command FIFO, pipelining, reading answers
    answers       Capabilities, ListEntry, UidlEntry
    streaming     consumers for streamed bodies, CRLF to LF
    tls           client TLS: chain and name checked, any failure fails the handshake
    connect       URL to a connected, verified-TLS, logged-in POP3Client
    fetch         the fetch loop over a POP3Client
    daemon        fetch --daemon: every account polled on its schedule, with backoff

The command line:
    cli           argument parsing for fetch, probe and migrate; main
    cli_fetch     runs fetch (either engine)
    cli_accounts  runs fetch --config (the accounts once, or the daemon)
    cli_probe     runs probe
    cli_migrate   runs migrate
    cli_credentials  user name and password/token sources
    cli_common    exit statuses, error messages, the reactor runner
"""
