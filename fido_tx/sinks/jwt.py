"""HS256 JSON Web Tokens, as GitLab's mail_room API expects them.

GitLab checks the ``Gitlab-Mailroom-Api-Request`` header with ruby-jwt:
HS256 only, issuer ``gitlab-mailroom``, ``iat`` no older than five minutes
and never in the future (no leeway), keyed with the base64-decoded content
of the secret file (32 bytes).  Signing is a few lines of the standard
library (RFC 7515/7519), so Fido takes no JWT dependency for it; the tests
check the tokens with PyJWT, another implementation.
"""

import base64
import binascii
import hashlib
import hmac
import json
import math
import os

GITLAB_HEADER = "Gitlab-Mailroom-Api-Request"
GITLAB_ISSUER = "gitlab-mailroom"
SECRET_BYTES = 32


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


_HEADER = b64url(b'{"typ":"JWT","alg":"HS256"}')


def encode_hs256(claims, key):
    """The compact JWS of ``claims`` (a dict) signed with HMAC-SHA256."""
    header = _HEADER
    payload = b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = header + b"." + payload
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64url(signature)).decode("ascii")


def gitlab_token(key, now, issuer=GITLAB_ISSUER, nonce=None):
    """The token for one request at wall-clock time ``now`` (seconds).

    ``iat`` is ``now`` rounded down: a token is never issued in the
    receiver's future, which ruby-jwt would refuse."""
    claims = {
        "iss": issuer,
        "iat": int(math.floor(now)),
        "nonce": nonce if nonce is not None else os.urandom(12).hex(),
    }
    return encode_hs256(claims, key)


def read_gitlab_secret(path):
    """The key in GitLab's ``.gitlab_mailroom_secret``: base64 of 32 bytes.

    :raises ValueError: one line naming the file and what is wrong with it
        (never its content).
    """
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{path} is not base64 (GitLab's .gitlab_mailroom_secret holds"
            f" the base64 of {SECRET_BYTES} random bytes)"
        ) from None
    if len(key) != SECRET_BYTES:
        raise ValueError(
            f"{path} decodes to {len(key)} bytes, GitLab needs {SECRET_BYTES}"
            " (copy the file GitLab uses, e.g. /etc/gitlab/.gitlab_mailroom_secret"
            " or <rails root>/.gitlab_mailroom_secret)"
        )
    return key
