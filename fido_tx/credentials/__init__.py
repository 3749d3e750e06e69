"""What an account proves itself with, behind one interface.

:func:`for_account` picks the credentials for an account's ``auth`` through
:data:`AUTHS` (a module path per auth, imported lazily, mail_room's registry
habit): each module defines ``build(account, ctx) -> ICredentials``.  The
session asks the credentials for what to send
(:meth:`~fido_tx.interfaces.ICredentials.secret`); the scrubber asks them
what to hide (:meth:`~fido_tx.interfaces.ICredentials.secret_forms`).

OAuth2 (``xoauth2``, ``oauthbearer``) lives in ``fido_tx/credentials/oauth.py``
(the OAuth issue); until that module exists, such an account fails with a
``config`` error that says so.
"""

import importlib

import attr

from fido_tx import errors
from fido_tx.errors import FidoError

#: auth name -> module defining ``build(account, ctx)``
AUTHS = {
    "login": "fido_tx.credentials.password",
    "plain": "fido_tx.credentials.password",
    # registration point of the OAuth2 token providers
    "xoauth2": "fido_tx.credentials.oauth",
    "oauthbearer": "fido_tx.credentials.oauth",
}

__all__ = ["AUTHS", "CredentialsContext", "for_account"]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CredentialsContext:
    """What credentials may need besides the account (token providers: the
    reactor for expiry, an HTTP agent, the state directory)."""

    reactor: object = None
    agent: object = None
    state_dir: str = ""
    log: object = None


def for_account(account, ctx=None):
    """The :class:`~fido_tx.interfaces.ICredentials` for ``account``.

    :raise FidoError: kind ``config`` for an unknown auth, or an OAuth2 auth
        while OAuth support is not installed.
    """
    auth = account.auth
    path = AUTHS.get(auth)
    if path is None:
        raise FidoError(errors.CONFIG, f"unknown auth {auth!r}")
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name != path:
            raise
        raise FidoError(errors.CONFIG, f"auth {auth} needs OAuth support, which this "
                                       f"Fido does not have: use auth login or plain")
    return module.build(account, ctx or CredentialsContext())
