"""A GitLab-like ``/api/v4/internal/mail_room/<mailbox_type>`` endpoint on
loopback (twisted.web), checking the ``Gitlab-Mailroom-Api-Request`` JWT the
way GitLab's ``Gitlab::MailRoom::Authenticator`` does, with PyJWT (not
Fido's own signing code): HS256 only, issuer ``gitlab-mailroom``, ``iat``
present, not in the future and no older than 5 minutes, keyed with the
base64-decoded secret file (which must be 32 bytes).

``mode`` picks the answer: ``ok`` (200 ``{"success":true}``),
``bad_request`` (400 ``{"success":false}``, as GitLab answers after it has
bounced an oversized mail), ``unauthorized`` (401), ``error`` (500),
``throttled`` (429 with ``Retry-After: <retry_after>``, 120 unless set;
``None``: no header), ``hang`` (never answers).  ``stop()``/``start()`` take it down and back up on
the same port.  Every request is kept in ``requests``.
"""

import base64
import json
import time

import attr
import jwt as pyjwt
from twisted.internet import defer
from twisted.web import resource, server

HEADER = b"Gitlab-Mailroom-Api-Request"
ISSUER = "gitlab-mailroom"
MAX_AGE = 300


@attr.s(auto_attribs=True)
class Request:
    path: str
    headers: dict
    body: bytes
    jwt_ok: bool
    jwt_error: str
    status: int


def check_token(token, secret_file_text, now=None):
    """"" when ``token`` passes GitLab's checks, else why not."""
    key = base64.b64decode(secret_file_text.strip(), validate=True)
    if len(key) != 32:
        return f"secret is {len(key)} bytes"
    try:
        claims = pyjwt.decode(
            token, key, algorithms=["HS256"], issuer=ISSUER,
            options={"require": ["iat", "iss"], "verify_iat": False},
        )
    except pyjwt.PyJWTError as e:
        return f"{type(e).__name__}: {e}"
    now = time.time() if now is None else now
    iat = claims["iat"]
    if not isinstance(iat, int):
        return "iat is not an integer"
    if iat > now:
        return "iat in the future"
    if iat < now - MAX_AGE:
        return "iat too old"
    if not claims.get("nonce"):
        return "no nonce"
    return ""


class _MailRoom(resource.Resource):
    isLeaf = True

    def __init__(self, endpoint):
        super().__init__()
        self.endpoint = endpoint

    def render_POST(self, request):
        ep = self.endpoint
        token = request.getHeader(HEADER)
        why = "no token" if token is None else check_token(token, ep.secret_text)
        headers = {k.decode().lower(): v[0].decode("latin-1")
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read()
        path = request.path.decode()
        status = {"ok": 200, "bad_request": 400, "unauthorized": 401,
                  "error": 500, "hang": 0, "throttled": 429}[ep.mode]
        if why and ep.check_jwt:
            status = 401
        if not path.startswith("/api/v4/internal/mail_room/"):
            status = 404
        ep.requests.append(Request(path, headers, body, not why, why, status))
        if status == 0:
            ep.hanging.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        if status == 429 and ep.retry_after is not None:
            request.setHeader(b"Retry-After", ep.retry_after.encode("latin-1"))
        if status == 200:
            return json.dumps({"success": True}).encode()
        if status == 400:
            return json.dumps({"success": False}).encode()
        if status == 401:
            return json.dumps({"message": "401 Unauthorized"}).encode()
        return json.dumps({"message": "500 Internal Server Error"}).encode()


class GitLabEndpoint:
    def __init__(self, reactor, secret_text, check_jwt=True):
        self.reactor = reactor
        self.secret_text = secret_text
        self.check_jwt = check_jwt
        self.mode = "ok"
        #: the Retry-After of a 429 (``None``: none)
        self.retry_after = "120"
        self.requests = []
        self.hanging = []
        self.port = None
        self._listening = None
        self._site = server.Site(_MailRoom(self))
        self._site.displayTracebacks = False

    def start(self):
        self._listening = self.reactor.listenTCP(
            self.port or 0, self._site, interface="127.0.0.1"
        )
        self.port = self._listening.getHost().port
        return self

    def stop(self):
        listening, self._listening = self._listening, None
        for request in self.hanging:
            if request.channel is not None:
                request.channel.transport.abortConnection()
        self.hanging = []
        return defer.maybeDeferred(listening.stopListening) if listening else defer.succeed(None)

    def url(self, mailbox_type="incoming_email"):
        return f"http://127.0.0.1:{self.port}/api/v4/internal/mail_room/{mailbox_type}"

    def delivered(self):
        """Requests GitLab would have processed (200 with a good token)."""
        return [r for r in self.requests if r.status == 200]
