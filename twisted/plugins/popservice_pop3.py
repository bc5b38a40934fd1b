"""The C{twistd pop3} plugin: see L{popservice.tap}."""

from twisted.application.service import ServiceMaker

popservicePOP3 = ServiceMaker(
    "popservice POP3 server",
    "popservice.tap",
    "A POP3 server (RFC 1939/2449/2595) serving Maildirs, with STLS and implicit TLS",
    "pop3",
)
