"""Requests to Microsoft Graph for one mailbox: token, limits, throttling.

:class:`GraphClient` sends each request with the account's bearer token and
``Prefer: IdType="ImmutableId"`` (message ids that survive moves between
folders: the dedupe key), through a :class:`MailboxGate` that keeps at most
``MAX_CONCURRENT`` requests in flight per mailbox (Graph's limit is 4) and
holds every request of the mailbox while Graph asks to wait:

* 429 and 503 (and 502/504) are retried after ``Retry-After`` seconds (or
  1, 2, 4 ... s without one); when the waits of one request add up past
  ``max_throttle_wait`` the request fails with kind ``throttled``;
* 401 invalidates the token and retries once with a fresh one; a second 401
  is kind ``auth``; 403 is kind ``auth`` with what to check (permission,
  consent, Exchange application access policy); 404 is kind ``mailbox``;
  410 (a delta link the service forgot) is :class:`Gone`.
"""

from urllib.parse import quote, urlencode

from twisted.internet import defer, task

from fido_tx import errors
from fido_tx import httpclient
from fido_tx.httpclient import MAX_JSON

#: Graph's limit of concurrent requests per mailbox
MAX_CONCURRENT = 4
RETRY_CODES = frozenset([429, 502, 503, 504])
#: Retry-After values above this are taken as this (seconds)
MAX_RETRY_AFTER = 300.0

WELL_KNOWN_FOLDERS = frozenset([
    "inbox", "archive", "deleteditems", "drafts", "junkemail", "sentitems", "outbox",
    "clutter", "conversationhistory", "msgfolderroot", "recoverableitemsdeletions",
    "scheduled", "searchfolders", "serverfailures", "syncissues",
])


class Gone(Exception):
    """HTTP 410: the delta link is no longer known; start over."""


class MailboxGate:
    """At most ``limit`` requests at once, and none before ``not_before``."""

    def __init__(self, reactor, limit=MAX_CONCURRENT):
        self._reactor = reactor
        self._semaphore = defer.DeferredSemaphore(limit)
        self.not_before = 0.0
        self.in_flight = 0
        self.most_in_flight = 0

    def hold(self, seconds):
        """No request of this mailbox starts in the next ``seconds``."""
        self.not_before = max(self.not_before, self._reactor.seconds() + seconds)

    @defer.inlineCallbacks
    def run(self, f):
        yield self._semaphore.acquire()
        try:
            wait = self.not_before - self._reactor.seconds()
            while wait > 0:
                yield task.deferLater(self._reactor, wait, lambda: None)
                wait = self.not_before - self._reactor.seconds()
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                result = yield f()
            finally:
                self.in_flight -= 1
        finally:
            self._semaphore.release()
        return result


class Gates:
    """One :class:`MailboxGate` per (endpoint, mailbox), shared by sessions."""

    def __init__(self, reactor, limit=MAX_CONCURRENT):
        self._reactor = reactor
        self._limit = limit
        self._gates = {}

    def for_mailbox(self, endpoint, user):
        key = (endpoint, user.lower())
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = MailboxGate(self._reactor, self._limit)
        return gate


def parse_retry_after(value, now):
    """Seconds from ``now`` (POSIX time) that a ``Retry-After`` value asks
    for: delta-seconds or an HTTP date (RFC 9110 10.2.3); ``None`` when
    absent or unreadable.  Capped at ``MAX_RETRY_AFTER``."""
    return httpclient.parse_retry_after(value, now, MAX_RETRY_AFTER)


def retry_after(response, attempt, now):
    """Seconds to wait before the next attempt (the header, else 2**attempt)."""
    seconds = parse_retry_after(response.header(b"Retry-After"), now)
    if seconds is None:
        seconds = min(float(2 ** attempt), MAX_RETRY_AFTER)
    return seconds


class GraphClient:
    """One mailbox's requests (see the module).

    :param http: :class:`fido_tx.httpclient.HttpClient`.
    :param credentials: an ``ICredentials`` whose secret is the access token.
    :param endpoint: ``graph_endpoint`` (without ``/v1.0``).
    """

    def __init__(self, reactor, http, credentials, endpoint, user, gate,
                 max_throttle_wait=120.0):
        self._reactor = reactor
        self._http = http
        self._credentials = credentials
        self.base = endpoint.rstrip("/") + "/v1.0"
        self.user_path = f"{self.base}/users/{quote(user, safe='@')}"
        self.gate = gate
        self.max_throttle_wait = max_throttle_wait
        #: seconds this client waited on Retry-After (for logs and tests)
        self.throttled_seconds = 0.0
        self.requests = 0

    def url(self, path, params=None):
        """An absolute URL under the user's path (``path`` starts with ``/``)."""
        url = self.user_path + path
        if params:
            url += "?" + urlencode(params, quote_via=quote, safe="$',")
        return url

    @defer.inlineCallbacks
    def send(self, method, url, body=None, max_body=MAX_JSON, ok=(200,)):
        """The :class:`~fido_tx.httpclient.HttpResponse` of one request,
        retried as the module says; errbacks with a FidoError or :class:`Gone`."""
        waited = 0.0
        attempt = 0
        refreshed = False
        while True:
            # the token is taken once a slot is free: a request queued behind
            # others must not carry a token that expired while it waited
            response = yield self.gate.run(lambda: self._request(method, url, body, max_body))
            code = response.code
            if code in ok:
                return response
            if code == 401 and not refreshed:
                refreshed = True
                self._credentials.invalidate()
                continue
            if code in RETRY_CODES:
                delay = retry_after(response, attempt, self._reactor.seconds())
                attempt += 1
                if waited + delay > self.max_throttle_wait:
                    kind = errors.THROTTLED if code in (429, 503) else errors.CONNECT
                    raise errors.FidoError(
                        kind, f"Microsoft Graph kept answering HTTP {code} for {waited:g} s"
                        f" (Retry-After {delay:g} s); trying again later",
                        debug=self._debug(response))
                self.gate.hold(delay)
                waited += delay
                self.throttled_seconds += delay
                continue
            raise self._error(method, response)

    @defer.inlineCallbacks
    def _request(self, method, url, body, max_body):
        token = yield self._credentials.secret()
        self.requests += 1
        headers = {b"Authorization": [b"Bearer " + token.encode("ascii", "replace")],
                   b"Prefer": [b'IdType="ImmutableId"'], b"Accept": [b"application/json"]}
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
        response = yield self._http.request(method, url, headers=headers, data=body,
                                            max_body=max_body)
        return response

    def _debug(self, response):
        return response.body[:300].decode("utf-8", "replace")

    def _error(self, method, response):
        code = response.code
        detail = ""
        try:
            error = response.json().get("error") or {}
            if isinstance(error, dict):
                detail = f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")[:200]
        except errors.FidoError:
            pass
        said = f"Microsoft Graph answered {method.decode() if isinstance(method, bytes) else method}" \
               f" with HTTP {code}" + (f" ({detail})" if detail else "")
        if code == 410:
            return Gone(said)
        if code == 401:
            return errors.FidoError(errors.AUTH, f"{said}: the access token was refused twice;"
                                    " check the application's permissions and oauth.scope")
        if code == 403:
            return errors.FidoError(
                errors.AUTH, f"{said}: access denied; the application needs Mail.ReadWrite"
                " (admin consent for app-only access) and, when an Exchange application access"
                " policy or RBAC scope is set, this mailbox in its scope")
        if code == 404:
            return errors.FidoError(errors.MAILBOX, f"{said}: no such mailbox, folder or message")
        if code >= 500:
            return errors.FidoError(errors.CONNECT, said, debug=self._debug(response))
        return errors.FidoError(errors.PROTOCOL, said, debug=self._debug(response))

    @defer.inlineCallbacks
    def get_json(self, url):
        response = yield self.send(b"GET", url)
        return response.json("Microsoft Graph")

    @defer.inlineCallbacks
    def pages(self, url, on_page):
        """GET ``url`` and every ``@odata.nextLink`` after it, calling
        ``on_page(document)`` per page; fires with the last page's document."""
        while True:
            document = yield self.get_json(url)
            on_page(document)
            following = document.get("@odata.nextLink")
            if not following:
                return document
            if not isinstance(following, str) or not following.startswith(self.base):
                raise errors.FidoError(errors.PROTOCOL, "Microsoft Graph sent an @odata.nextLink"
                                       " outside the endpoint", debug=str(following)[:200])
            url = following

    @defer.inlineCallbacks
    def folder_id(self, name):
        """The id of the folder ``name``: a well-known name, a display name, or a
        path of display names ``Parent/Child``; kind ``mailbox`` when missing."""
        if name.lower() in WELL_KNOWN_FOLDERS:
            document = yield self.get_json(self.url(f"/mailFolders/{name.lower()}"))
            return document["id"]
        parent = None
        for part in name.split("/"):
            where = "/mailFolders" if parent is None else f"/mailFolders/{quote(parent)}/childFolders"
            escaped = part.replace("'", "''")
            found = []
            yield self.pages(
                self.url(where, {"$filter": f"displayName eq '{escaped}'", "$select": "id,displayName",
                                 "includeHiddenFolders": "true"}),
                lambda doc: found.extend(doc.get("value") or []))
            if not found:
                raise errors.FidoError(errors.MAILBOX, f"Microsoft Graph: no folder {name!r} in"
                                       " this mailbox (a well-known name like inbox or archive,"
                                       " or a display name; Parent/Child for a subfolder)")
            parent = found[0]["id"]
        return parent
