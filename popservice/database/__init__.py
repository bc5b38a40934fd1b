"""
PostgreSQL, shared by the mail store (L{popservice.stores.postgres}) and the
user checker (L{popservice.auth.pgusers}): C{pool} (connections in a thread
pool, transactions retried on serialization failures) and C{schema} (the
versioned schema and its migrations).
"""

from popservice.database.pool import Database

__all__ = ["Database"]
