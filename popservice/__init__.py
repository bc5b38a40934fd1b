"""popservice: a POP3 server and client for Twisted."""

__version__ = "0.1.0"
