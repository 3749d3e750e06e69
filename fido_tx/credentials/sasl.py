"""The SASL initial responses that carry an OAuth2 bearer token over IMAP.

* ``XOAUTH2`` (Google, Microsoft): ``base64("user=" user ^A "auth=Bearer "
  token ^A ^A)``.
* ``OAUTHBEARER`` (RFC 7628): a GS2 header ``n,a=user,`` then ``^A``-separated
  ``host=``, ``port=`` and ``auth=Bearer token`` key/values, ending ``^A^A``.

On failure both mechanisms send a *server error challenge*: base64 of a JSON
status (``{"status":"401","schemes":"bearer","scope":"..."}``).  The client
must answer it with an empty response (RFC 7628 3.2.3) before the server ends
the exchange with a tagged NO.  :func:`decode_error_challenge` turns the
challenge into one readable line; it never contains the token, which the
server never echoes.
"""

import base64
import binascii
import json

#: the JSON keys of an error challenge shown to an operator, in this order
_STATUS_KEYS = ("status", "schemes", "scope", "openid-configuration")


def _check(name, value):
    if "\x01" in value or "\r" in value or "\n" in value:
        raise ValueError(f"{name} contains a control character")


def xoauth2(user, token):
    """The base64 initial response of ``AUTHENTICATE XOAUTH2`` (bytes)."""
    _check("user", user)
    _check("token", token)
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode("utf-8")
    return base64.b64encode(raw)


def _saslname(user):
    # RFC 5801: "," and "=" in the authzid are escaped as =2C and =3D
    return user.replace("=", "=3D").replace(",", "=2C")


def oauthbearer(user, token, host, port):
    """The base64 initial response of ``AUTHENTICATE OAUTHBEARER`` (bytes)."""
    _check("user", user)
    _check("token", token)
    _check("host", host)
    raw = (
        f"n,a={_saslname(user)},\x01host={host}\x01port={int(port)}\x01"
        f"auth=Bearer {token}\x01\x01"
    ).encode("utf-8")
    return base64.b64encode(raw)


def decode_error_challenge(challenge):
    """The server's base64 JSON error challenge -> one line for a person.

    ``challenge`` is bytes or str (the text after ``+ ``).  Anything that is
    not base64 JSON is described, never echoed beyond 100 characters.
    """
    if isinstance(challenge, bytes):
        challenge = challenge.decode("ascii", "replace")
    challenge = challenge.strip()
    if not challenge:
        return "the server sent an empty challenge"
    try:
        text = base64.b64decode(challenge, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return f"the server sent a challenge that is not base64: {challenge[:100]!r}"
    try:
        status = json.loads(text)
    except ValueError:
        return f"the server said: {' '.join(text.split())[:200]}"
    if not isinstance(status, dict):
        return f"the server said: {' '.join(text.split())[:200]}"
    parts = []
    for key in _STATUS_KEYS:
        if key in status:
            parts.append(f"{key}={str(status[key])[:200]}")
    for key in sorted(k for k in status if k not in _STATUS_KEYS):
        parts.append(f"{key}={str(status[key])[:100]}")
    meaning = {"400": "bad request", "401": "token rejected (expired, revoked or wrong scope)",
               "403": "token lacks permission for this mailbox",
               "invalid_token": "token rejected (expired, revoked or wrong scope)"}
    hint = meaning.get(str(status.get("status", "")))
    line = "the server's OAuth2 status: " + (", ".join(parts) or "{}")
    return f"{line} ({hint})" if hint else line
