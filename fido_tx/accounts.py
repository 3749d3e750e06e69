"""Accounts: the value objects, loading the accounts file, and set differences.

SKELETON: the ``Account`` class is final (other modules rely on it); the
loading functions are to be implemented (see their docstrings).
"""

import attr

SECURITY_DEFAULT_PORTS = {"tls": 993, "starttls": 143, "none": 143}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Account:
    """One mailbox to fetch from.  Frozen: a change is a new value.

    The password is never shown by ``repr`` or ``str`` (logs, tracebacks).
    """

    id: str
    host: str
    username: str
    password: str = attr.ib(repr=False)
    port: int = 993
    #: "tls" (implicit), "starttls" (required upgrade) or "none" (explicit plain)
    security: str = "tls"
    mailbox: str = "INBOX"
    #: "seen", "delete" or "move:FOLDER"
    after_fetch: str = "seen"
    #: extra trust root (PEM path) for this account's server certificate
    ca_file: str | None = None
    #: "login" (LOGIN) or "plain" (AUTHENTICATE PLAIN)
    auth: str = "login"

    @property
    def move_target(self):
        """The folder of ``move:FOLDER``, else ``None``."""
        if self.after_fetch.startswith("move:"):
            return self.after_fetch[len("move:"):]
        return None
