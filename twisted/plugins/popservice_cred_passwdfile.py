"""
strcred plugin: C{--auth passwd-file:/path/to/users} (a Dovecot-style passwd-file).
"""

from popservice.auth.passwdfile import PasswdFileCheckerFactory

thePasswdFileCheckerFactory = PasswdFileCheckerFactory()
