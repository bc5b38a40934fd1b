"""
New mail into any L{popservice.interfaces.IMailDelivery} store (the Maildir
store today, PostgreSQL tomorrow), from three doors:

 - L{lmtp}: an LMTP server (RFC 2033) on Twisted's ESMTP server, for
   C{twistd pop3 --lmtp ENDPOINT} (Postfix's C{lmtp:} transport, Exim's
   C{lmtp} transport);
 - L{deliver}: C{popservice deliver USER}, a message on stdin, sysexits exit
   codes (an MTA's mailbox command);
 - L{domain}: a C{twisted.mail.mail.IDomain} for twisted.mail's own SMTP
   server (L{twisted.mail.mail.MailService}).

L{key} computes the idempotency key all three give the store: the
Message-ID plus a SHA-256 of the message, so a retried message is stored once.
L{common} maps addresses to users and store failures to their kind
(permanent, out of space, temporary).

These modules know the store only through its interfaces; L{lmtp} and
L{domain} import no store at all and nothing here imports the POP3 server or
client (contracts in pyproject.toml).
"""
