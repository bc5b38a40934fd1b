"""
popservice composes into a larger Twisted mail stack: twisted.mail's own ESMTP
server delivers into Maildirs and popservice serves them, in one Application.
This is the README's recipe, run for real over loopback sockets.
"""

from __future__ import annotations

import io
import os
import poplib
from typing import Any

from twisted.application import service, strports
from twisted.cred import checkers
from twisted.internet import defer, threads
from twisted.mail import mail, maildir, smtp
from twisted.mail.pop3 import IMailbox as TwistedIMailbox
from twisted.trial import unittest

from popservice.delivery.domain import DeliveryDomain
from popservice.server.factory import makeServer
from popservice.stores.maildir import MaildirStore, ensure_maildir
from tests.support import memory_checker


def build_application(root: str, smtp_port: int, pop3_port: int) -> service.Application:
    application = service.Application("mail")
    store = MaildirStore(os.path.join(root, "%u"))
    ensure_maildir(os.path.join(root, "alice"))  # alice's mailbox (popservice passwd add --maildir)
    mail_service = mail.MailService()
    mail_service.addDomain(b"example.org", DeliveryDomain(store))
    mail_service.smtpPortal.registerChecker(checkers.AllowAnonymousAccess())
    mail_service.setServiceParent(application)
    strports.service("tcp:%d:interface=127.0.0.1" % smtp_port,
                     mail_service.getESMTPFactory()).setServiceParent(application)
    pop3 = makeServer(store, [memory_checker(alice="secret")])
    strports.service("tcp:%d:interface=127.0.0.1" % pop3_port, pop3).setServiceParent(application)
    return application


class ComposeWithTwistedMail(unittest.TestCase):
    @defer.inlineCallbacks
    def test_smtp_in_pop3_out(self) -> Any:
        from twisted.internet import reactor

        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        ports = []
        for _ in range(2):
            p = reactor.listenTCP(0, smtp.SMTPFactory(), interface="127.0.0.1")
            ports.append(p.getHost().port)
            yield p.stopListening()
        application = build_application(root, ports[0], ports[1])
        top = service.IService(application)
        top.startService()
        self.addCleanup(top.stopService)
        body = b"Subject: composed\r\n\r\nDelivered by twisted.mail.\r\n.leading dot\r\n"
        yield smtp.sendmail("127.0.0.1", "bob@example.net", ["alice@example.org"], io.BytesIO(body),
                            port=ports[0])

        def fetch() -> bytes:
            client = poplib.POP3("127.0.0.1", ports[1], timeout=10)
            client.user("alice")
            client.pass_("secret")
            count, _ = client.stat()
            assert count == 1, count
            lines = client.retr(1)[1]
            client.quit()
            return b"\r\n".join(lines) + b"\r\n"

        received = yield threads.deferToThread(fetch)
        self.assertIn(b"Subject: composed\r\n", received)
        self.assertTrue(received.endswith(b"Delivered by twisted.mail.\r\n.leading dot\r\n"), received)

    def test_twisted_mailbox_avatar_served_as_is(self) -> None:
        """A realm that returns twisted.mail.pop3.IMailbox avatars plugs straight in."""
        from popservice.stores.twistedmail import TwistedMailboxAdapter

        root = self.mktemp()
        maildir.initializeMaildir(root)
        with open(os.path.join(root, "new", "1700000000.M1P1.host"), "wb") as f:
            f.write(b"Subject: x\n\nhello\n")
        adapter = TwistedMailboxAdapter(maildir.MaildirMailbox(root.encode()))
        self.assertTrue(TwistedIMailbox.providedBy(adapter.mailbox))
        listing = self.successResultOf(adapter.listing())
        self.assertEqual(len(listing), 1)
        stream = self.successResultOf(adapter.open(0))
        self.assertEqual(self.successResultOf(stream.read()), b"Subject: x\n\nhello\n")
