"""Password credentials (``auth = "login"`` or ``"plain"``)."""

from twisted.internet import defer
from zope.interface import implementer

from fido_tx.interfaces import ICredentials
from fido_tx.scrub import secret_forms


@implementer(ICredentials)
class PasswordCredentials:
    """A fixed password.  ``repr`` never shows it."""

    __slots__ = ("user", "_password", "_forms")

    def __init__(self, user, password):
        self.user = user
        self._password = password
        self._forms = None

    def secret(self):
        return defer.succeed(self._password)

    def invalidate(self):
        """A refused password stays the same: nothing to refresh."""

    def lifetime(self):
        """A password does not expire."""
        return None

    def secret_forms(self):
        if self._forms is None:  # computed once, and only when something is scrubbed
            self._forms = secret_forms(self._password, self.user)
        return self._forms

    def __repr__(self):
        return f"<PasswordCredentials user={self.user!r}>"


def build(account, ctx):
    return PasswordCredentials(account.username, account.password)
