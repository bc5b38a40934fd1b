"""
strcred plugin: C{--auth postgresql://user@host/db} (the users table of
popservice's PostgreSQL schema).
"""

from popservice.auth.pgusers import PostgresUserCheckerFactory

thePostgresUserCheckerFactory = PostgresUserCheckerFactory()
