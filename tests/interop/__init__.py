"""
Interoperability tests: a real C{twistd pop3} process driven by real clients
(poplib, curl, openssl s_client, fetchmail, mpop, getmail6) and by raw
sockets for robustness.  See L{tests.interop.world}.
"""
