"""A fake OAuth2 token endpoint (RFC 6749 section 4.4 and 6, as the Microsoft
identity platform and Google answer them), as a ``twisted.web`` resource.

Use it in memory through ``treq.testing.StubTreq`` (on a ``task.Clock``) or
on loopback with :func:`listen`.  ``POST`` form bodies:

* ``grant_type=client_credentials`` with ``client_id``, ``client_secret``,
  ``scope``;
* ``grant_type=refresh_token`` with ``client_id``, (``client_secret``),
  ``refresh_token``, (``scope``).  With ``rotate`` each answer carries a new
  refresh token and, with ``single_use``, the one used stops working (so a
  client that keeps using an old one gets ``invalid_grant``).

Answers ``{"token_type": "Bearer", "access_token", "expires_in",
("refresh_token")}``, or HTTP 400 ``{"error": "invalid_grant"|"invalid_client"
|"unsupported_grant_type", "error_description"}``.  ``valid(token)`` tells a
fake resource server whether a bearer token is current.
"""

import itertools
import json
import secrets
from urllib.parse import parse_qs

from twisted.internet import reactor as global_reactor
from twisted.web import resource, server


class FakeTokenEndpoint(resource.Resource):
    isLeaf = True

    def __init__(self, clock=None, expires_in=3600, rotate=True, single_use=True):
        super().__init__()
        self.clock = clock or global_reactor
        self.expires_in = expires_in
        self.rotate = rotate
        self.single_use = single_use
        #: client_id -> client_secret
        self.clients = {}
        #: refresh token -> client_id (the ones that work now)
        self.refresh_tokens = {}
        #: access token -> (client_id, scope, expires_at)
        self.access_tokens = {}
        #: every access token ever issued, in order
        self.issued = []
        #: every request: dict of the form fields (secrets included: tests only)
        self.requests = []
        #: refresh tokens presented, in order
        self.presented = []
        self.fail_next = []  # (code, body) answered to the next requests
        #: seconds every answer is held (to see concurrent requests)
        self.delay = 0.0
        self._serial = itertools.count(1)

    def add_client(self, client_id, client_secret="", refresh_token=None):
        self.clients[client_id] = client_secret
        if refresh_token:
            self.refresh_tokens[refresh_token] = client_id

    def revoke_all(self):
        """Every refresh token stops working (``invalid_grant`` from now on)."""
        self.refresh_tokens.clear()

    def valid(self, token):
        entry = self.access_tokens.get(token)
        return entry is not None and self.clock.seconds() < entry[2]

    def _error(self, request, code, error, description):
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"error": error, "error_description": description}).encode()

    def render_POST(self, request):
        answer = self._render(request)
        if not self.delay:
            return answer

        def finish():
            request.write(answer)
            request.finish()

        self.clock.callLater(self.delay, finish)
        return server.NOT_DONE_YET

    def _render(self, request):
        body = request.content.read().decode("utf-8")
        form = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
        self.requests.append(form)
        if self.fail_next:
            code, answer = self.fail_next.pop(0)
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(answer).encode()
        client_id = form.get("client_id", "")
        if client_id not in self.clients:
            return self._error(request, 400, "unauthorized_client", "AADSTS700016: unknown app")
        grant = form.get("grant_type")
        answer = {"token_type": "Bearer", "expires_in": self.expires_in}
        if grant == "client_credentials":
            if form.get("client_secret") != self.clients[client_id]:
                return self._error(request, 401, "invalid_client", "AADSTS7000215: bad secret")
        elif grant == "refresh_token":
            presented = form.get("refresh_token", "")
            self.presented.append(presented)
            if self.clients[client_id] and form.get("client_secret") != self.clients[client_id]:
                return self._error(request, 401, "invalid_client", "AADSTS7000215: bad secret")
            if self.refresh_tokens.get(presented) != client_id:
                return self._error(request, 400, "invalid_grant",
                                   "AADSTS70008: The provided authorization code or refresh"
                                   " token has expired or was revoked.")
            if self.rotate:
                fresh = f"rt-{next(self._serial)}-{secrets.token_urlsafe(12)}"
                if self.single_use:
                    del self.refresh_tokens[presented]
                self.refresh_tokens[fresh] = client_id
                answer["refresh_token"] = fresh
        else:
            return self._error(request, 400, "unsupported_grant_type", f"grant {grant!r}")
        token = f"at-{next(self._serial)}-{secrets.token_urlsafe(16)}"
        self.access_tokens[token] = (client_id, form.get("scope", ""),
                                     self.clock.seconds() + self.expires_in)
        answer["access_token"] = token
        self.issued.append(token)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(answer).encode()


def listen(reactor, root):
    """Serve ``root`` on a free loopback port -> the listening port."""
    return reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")


class FakeIntrospection(resource.Resource):
    """RFC 7662 token introspection for a resource server (Dovecot's
    ``passdb oauth2`` with ``introspection_mode = post``): ``POST token=...``
    answers ``{"active": true, "username": ...}`` while ``tokens`` (a
    :class:`FakeTokenEndpoint`) says the token is valid, else
    ``{"active": false}``.  ``user``: the mailbox every valid token is for.
    ``asked``: the tokens presented, in order."""

    isLeaf = True

    def __init__(self, tokens, user):
        super().__init__()
        self.tokens = tokens
        self.user = user
        self.asked = []

    def render_POST(self, request):
        body = request.content.read().decode("utf-8")
        token = parse_qs(body).get("token", [""])[0]
        self.asked.append(token)
        request.setHeader(b"Content-Type", b"application/json")
        if not self.tokens.valid(token):
            return json.dumps({"active": False}).encode()
        return json.dumps({"active": True, "username": self.user}).encode()
