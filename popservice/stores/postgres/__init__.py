"""
The PostgreSQL mail store (its schema and connections: L{popservice.database}):
C{lease} (the cluster-wide session lock), C{mailbox} (a session's view:
listing, streaming, UPDATE), C{store} (login and delivery).
"""

from popservice.stores.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
