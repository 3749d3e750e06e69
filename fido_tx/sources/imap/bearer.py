"""IMAP ``AUTHENTICATE XOAUTH2`` and ``AUTHENTICATE OAUTHBEARER`` (RFC 7628).

:func:`authenticate` logs a :class:`~fido_tx.sources.imap.client.FidoIMAP4Client`
in with an access token from the account's credentials
(:mod:`fido_tx.credentials.oauth`).  The initial response goes on the
command line when the server offers ``SASL-IR``, else after the first
``+``.  A refused token gets the server's *error challenge* (base64 JSON);
the client answers it with the dummy response (OAUTHBEARER: one %x01, RFC
7628 3.2.3; XOAUTH2: an empty line, as Google documents), the server ends
with a tagged NO, and the decoded status
goes into the error.  On that first refusal the token is invalidated and the
login tried once more with a fresh one; a second refusal is kind ``auth``.
Nothing here logs or returns the token: the client traces the command as
``AUTHENTICATE XOAUTH2 <redacted>``.
"""

from fido_tx import errors
from fido_tx.credentials import sasl
from fido_tx.errors import FidoError
from fido_tx.sources.imap.client import ImapCommandError, _show

MECHANISMS = {"xoauth2": b"XOAUTH2", "oauthbearer": b"OAUTHBEARER"}
#: the client's answer to an error challenge (base64): ^A, or nothing
DUMMY_RESPONSE = {"xoauth2": b"", "oauthbearer": b"AQ=="}


def initial_response(account, token):
    """The base64 SASL initial response of ``account.auth`` for ``token``."""
    if account.auth == "xoauth2":
        return sasl.xoauth2(account.username, token)
    return sasl.oauthbearer(account.username, token, account.host, account.port)


async def _attempt(proto, caps, account, token, challenges):
    mechanism = MECHANISMS[account.auth]
    response = initial_response(account, token)
    sent = []

    def continuation(rest):
        if not sent and b"SASL-IR" not in caps:
            sent.append(True)
            proto.send_secret(response)
            return
        # the error challenge: decode it for the report and let the server end
        # the exchange with a NO: OAUTHBEARER wants a dummy response of one
        # %x01 (RFC 7628 3.2.3), XOAUTH2 an empty one (Google's documentation)
        challenges.append(sasl.decode_error_challenge(rest))
        proto.send_secret(DUMMY_RESPONSE[account.auth])

    if b"SASL-IR" in caps:
        sent.append(True)
        return await proto.command(b"AUTHENTICATE", mechanism + b" " + response,
                                   continuation=continuation)
    return await proto.command(b"AUTHENTICATE", mechanism, continuation=continuation)


async def authenticate(proto, caps, account, credentials):
    """Log in with a bearer token; fires with the tagged OK text.

    :param caps: the server's capabilities (a set of bytes).
    :param credentials: the account's ``ICredentials`` (an OAuth provider).
    :raises FidoError: ``auth`` (refused twice, or the server does not offer
        the mechanism), ``protocol`` (BAD), or the token provider's error
        (``reauthorize``, ``throttled``, ...).
    """
    mechanism = MECHANISMS[account.auth]
    if b"AUTH=" + mechanism not in caps:
        raise FidoError(errors.AUTH, f"the server does not offer the SASL mechanism"
                        f" {mechanism.decode()} (no AUTH={mechanism.decode()}; it offers "
                        + (" ".join(sorted(c.decode("ascii", "replace") for c in caps
                                           if c.startswith(b"AUTH="))) or "no SASL mechanism")
                        + ")")
    for attempt in (1, 2):
        token = await credentials.secret()
        challenges = []
        try:
            return await _attempt(proto, caps, account, token, challenges)
        except ImapCommandError as e:
            if e.status == b"BAD":
                raise FidoError(errors.PROTOCOL, f"the server rejected the"
                                f" {mechanism.decode()} login: {_show(e.text)}") from None
            credentials.invalidate()
            if attempt == 2:
                said = challenges[-1] if challenges else "no error challenge"
                raise FidoError(errors.AUTH, f"the {mechanism.decode()} login was refused twice"
                                f" (a fresh token the second time): {_show(e.text)}; {said}."
                                " Check the mailbox's permission for the application"
                                " (Exchange: the service principal's mailbox access; Gmail:"
                                " the https://mail.google.com/ scope)") from None
