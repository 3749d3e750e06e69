"""A fake Microsoft Graph mail service (v1.0), as a ``twisted.web`` resource.

It follows the documented API for what Fido uses, under
``/v1.0/users/{user}/``:

* ``GET mailFolders/{id or well-known name}``; ``GET mailFolders`` and
  ``mailFolders/{id}/childFolders`` with ``$filter=displayName eq '...'``;
* ``GET mailFolders/{f}/messages`` with ``$filter=isRead eq false``,
  ``$select``, ``$top`` and ``$skip`` (``@odata.nextLink`` while more);
* ``GET mailFolders/{f}/messages/delta``: pages with ``@odata.nextLink``
  (``$skiptoken``), the last with ``@odata.deltaLink`` (``$deltatoken``);
  removed messages as ``{"id", "@removed": {"reason"}}``; a delta token from
  before :meth:`FakeGraph.forget_delta_tokens` is HTTP 410 Gone;
* ``GET messages/{id}/$value`` (the MIME, byte for byte); ``PATCH
  messages/{id}`` (``isRead``); ``DELETE messages/{id}`` (to Deleted Items);
  ``POST messages/{id}/move`` (``destinationId``; the immutable id stays);
* every request needs ``Authorization: Bearer <token>`` that the fake token
  endpoint issued and that has not expired (else 401
  ``InvalidAuthenticationToken``); :meth:`throttle` answers the next requests
  429 with ``Retry-After``; ``delay`` holds every answer that many seconds
  (to see concurrency: ``most_in_flight`` per mailbox).

Ids are immutable ids whatever ``Prefer`` says; the header is recorded.
"""

import itertools
import json
from collections import defaultdict
from urllib.parse import quote, unquote

from twisted.internet import reactor as global_reactor
from twisted.web import resource, server

from fido_tx.timefmt import iso_utc, parse_iso

WELL_KNOWN = ("inbox", "archive", "deleteditems", "drafts", "junkemail", "sentitems")
DELTA_PAGE = 10


class FakeMessage:
    def __init__(self, message_id, folder, mime, internet_message_id, seq, received=0.0):
        self.received = received
        self.id = message_id
        self.folder = folder
        self.mime = mime
        self.internet_message_id = internet_message_id
        self.is_read = False
        self.categories = []
        self.seq = seq

    def json(self, select=None):
        full = {"id": self.id, "internetMessageId": self.internet_message_id,
                "isRead": self.is_read, "parentFolderId": self.folder,
                "receivedDateTime": iso_utc(self.received), "categories": list(self.categories)}
        if select:
            return {k: v for k, v in full.items() if k in select}
        return full


class FakeMailbox:
    def __init__(self, serial):
        self._serial = serial
        self.seq = 0
        self.folders = {}
        self.well_known = {}
        self.messages = {}
        self.tombstones = []  # (folder, id, seq)
        self.forgotten_before = 0
        for name in WELL_KNOWN:
            display = {"inbox": "Inbox", "deleteditems": "Deleted Items",
                       "junkemail": "Junk Email", "sentitems": "Sent Items"}.get(name, name.title())
            self.well_known[name] = self.add_folder(display)

    def add_folder(self, display_name, parent=None):
        folder_id = f"AAMkF{next(self._serial)}x{display_name.replace(' ', '')}=="
        self.folders[folder_id] = {"id": folder_id, "displayName": display_name,
                                   "parentFolderId": parent}
        return folder_id

    def folder(self, name):
        return self.well_known.get(name.lower(), name if name in self.folders else None)

    def bump(self, message):
        self.seq += 1
        message.seq = self.seq

    def remove_from(self, message, reason="deleted"):
        self.seq += 1
        self.tombstones.append((message.folder, message.id, self.seq))


class FakeGraph(resource.Resource):
    isLeaf = True

    def __init__(self, tokens=None, clock=None, base_url="https://graph.test"):
        super().__init__()
        self.tokens = tokens
        self.clock = clock or global_reactor
        self.base_url = base_url
        self._serial = itertools.count(1)
        self.mailboxes = {}
        self.log = []  # (time, method, path, query, prefer)
        self.codes = []  # the status of each answer, in order
        self.throttled = []  # answers still to throttle: Retry-After values
        self.delay = 0.0
        self.pending = []  # delayed answers (cancelled by stop)
        self.in_flight = defaultdict(int)
        self.most_in_flight = defaultdict(int)

    # -- test set-up -----------------------------------------------------

    def mailbox(self, user):
        user = user.lower()
        if user not in self.mailboxes:
            self.mailboxes[user] = FakeMailbox(self._serial)
        return self.mailboxes[user]

    def add_message(self, user, mime, folder="inbox", internet_message_id=None):
        box = self.mailbox(user)
        n = next(self._serial)
        message_id = f"AAkALgImm{n:06d}-id_{n}="
        box.seq += 1
        message = FakeMessage(message_id, box.folder(folder), mime,
                              internet_message_id or f"<m{n}@fake.test>", box.seq,
                              self.clock.seconds())
        box.messages[message_id] = message
        return message_id

    def throttle(self, count, retry_after=1):
        self.throttled.extend([retry_after] * count)

    def forget_delta_tokens(self, user):
        box = self.mailbox(user)
        box.forgotten_before = box.seq + 1

    def messages_in(self, user, folder="inbox"):
        box = self.mailbox(user)
        return [m for m in box.messages.values() if m.folder == box.folder(folder)]

    def stop(self):
        """Drop the answers still held by ``delay``."""
        for call in self.pending:
            if call.active():
                call.cancel()
        self.pending = []

    # -- HTTP ------------------------------------------------------------

    def render(self, request):
        path = [unquote(p) for p in request.path.decode("ascii").split("/")]
        query = {k.decode(): v[0].decode() for k, v in request.args.items()}
        prefer = request.getHeader(b"prefer")
        self.log.append((self.clock.seconds(), request.method.decode(), "/".join(path), query,
                         prefer))
        user = path[3].lower() if len(path) > 3 else ""
        self.in_flight[user] += 1
        self.most_in_flight[user] = max(self.most_in_flight[user], self.in_flight[user])
        code, headers, body = self._answer(request, path, query)
        self.codes.append(code)

        def finish():
            self.in_flight[user] -= 1
            request.setResponseCode(code)
            for k, v in headers.items():
                request.setHeader(k, v)
            request.write(body)
            request.finish()

        if self.delay:
            gone = []
            request.notifyFinish().addErrback(gone.append)
            call = self.clock.callLater(self.delay, lambda: None if gone else finish())
            self.pending = [c for c in self.pending if c.active()] + [call]
        else:
            finish()
        return server.NOT_DONE_YET

    def _json(self, code, document):
        return code, {b"Content-Type": b"application/json"}, json.dumps(document).encode()

    def _error(self, code, error_code, message):
        return self._json(code, {"error": {"code": error_code, "message": message}})

    def _answer(self, request, path, query):
        auth = (request.getHeader(b"authorization") or b"").decode("latin-1")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if self.tokens is not None and not self.tokens.valid(token):
            return self._error(401, "InvalidAuthenticationToken", "Access token has expired"
                               " or is not yet valid.")
        if self.throttled:
            after = self.throttled.pop(0)
            return 429, {b"Retry-After": str(after).encode(),
                         b"Content-Type": b"application/json"}, json.dumps(
                {"error": {"code": "ApplicationThrottled", "message": "too many"}}).encode()
        if len(path) < 5 or path[1] != "v1.0" or path[2] != "users":
            return self._error(400, "BadRequest", "unsupported path")
        box = self.mailboxes.get(path[3].lower())
        if box is None:
            return self._error(404, "ErrorInvalidUser", "The requested user is invalid.")
        rest = path[4:]
        body = request.content.read() if request.content is not None else b""
        method = request.method.decode()
        if rest[0] == "mailFolders":
            return self._folders(box, path[3], rest[1:], query, method)
        if rest[0] == "messages" and len(rest) >= 2:
            return self._message(box, rest[1], rest[2:], method, body)
        return self._error(400, "BadRequest", "unsupported path")

    def _folders(self, box, user, rest, query, method):
        if not rest or (len(rest) == 2 and rest[1] == "childFolders"):
            parent = None if not rest else box.folder(rest[0])
            wanted = None
            flt = query.get("$filter", "")
            if flt.startswith("displayName eq '"):
                wanted = flt[len("displayName eq '"):-1].replace("''", "'")
            found = [f for f in box.folders.values()
                     if f["parentFolderId"] == parent and (wanted is None or f["displayName"] == wanted)]
            return self._json(200, {"value": found})
        folder = box.folder(rest[0])
        if folder is None:
            return self._error(404, "ErrorItemNotFound", "The specified object was not found.")
        if len(rest) == 1:
            inside = [m for m in box.messages.values() if m.folder == folder]
            return self._json(200, dict(box.folders[folder], totalItemCount=len(inside),
                                        unreadItemCount=sum(not m.is_read for m in inside)))
        if rest[1:] == ["messages"]:
            return self._list(box, user, rest[0], folder, query)
        if rest[1:] == ["messages", "delta"]:
            return self._delta(box, user, rest[0], folder, query)
        return self._error(400, "BadRequest", "unsupported path")

    def _list(self, box, user, name, folder, query):
        found = [m for m in box.messages.values() if m.folder == folder]
        for condition in query.get("$filter", "").split(" and "):
            if condition == "isRead eq false":
                found = [m for m in found if not m.is_read]
            elif condition.startswith("receivedDateTime ge "):
                since = parse_iso(condition[len("receivedDateTime ge "):])
                found = [m for m in found if m.received >= since]
            elif condition:
                return self._error(400, "BadRequest", f"unsupported filter {condition!r}")
        top, skip = int(query.get("$top", 10)), int(query.get("$skip", 0))
        select = query.get("$select", "").split(",") if query.get("$select") else None
        page = {"value": [m.json(select) for m in found[skip:skip + top]]}
        if skip + top < len(found):
            following = dict(query, **{"$skip": str(skip + top)})
            page["@odata.nextLink"] = self._url(user, f"mailFolders/{name}/messages", following)
        return self._json(200, page)

    def _url(self, user, path, query):
        q = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        return f"{self.base_url}/v1.0/users/{quote(user, safe='@')}/{path}?{q}"

    def _delta(self, box, user, name, folder, query):
        if "$skiptoken" in query:
            since, upto, offset = (int(x) for x in query["$skiptoken"].split("."))
        else:
            since = int(query["$deltatoken"]) if "$deltatoken" in query else 0
            upto, offset = box.seq, 0
            if "$deltatoken" in query and since < box.forgotten_before:
                return self._error(410, "SyncStateNotFound", "The sync state is not found;"
                                   " start a full synchronization.")
        changes = [m.json({"id", "internetMessageId", "isRead", "categories"})
                   for m in box.messages.values() if m.folder == folder and since < m.seq <= upto]
        if since:
            changes += [{"id": i, "@removed": {"reason": "deleted"}}
                        for f, i, seq in box.tombstones if f == folder and since < seq <= upto]
        page = {"value": changes[offset:offset + DELTA_PAGE]}
        if offset + DELTA_PAGE < len(changes):
            page["@odata.nextLink"] = self._url(
                user, f"mailFolders/{name}/messages/delta",
                {"$skiptoken": f"{since}.{upto}.{offset + DELTA_PAGE}"})
        else:
            page["@odata.deltaLink"] = self._url(user, f"mailFolders/{name}/messages/delta",
                                                 {"$deltatoken": str(upto)})
        return self._json(200, page)

    def _message(self, box, message_id, rest, method, body):
        message = box.messages.get(message_id)
        if message is None:
            return self._error(404, "ErrorItemNotFound", "The specified object was not found.")
        if rest == ["$value"] and method == "GET":
            return 200, {b"Content-Type": b"text/plain"}, message.mime
        if not rest and method == "PATCH":
            change = json.loads(body)
            if "isRead" in change:
                message.is_read = bool(change["isRead"])
            if "categories" in change:
                message.categories = list(change["categories"])
            box.bump(message)
            return self._json(200, message.json())
        if not rest and method == "DELETE":
            self._move(box, message, box.well_known["deleteditems"])
            return 204, {}, b""
        if rest == ["move"] and method == "POST":
            target = box.folder(json.loads(body).get("destinationId", ""))
            if target is None:
                return self._error(400, "ErrorInvalidIdMalformed", "bad destinationId")
            self._move(box, message, target)
            return self._json(201, message.json())
        return self._error(405, "ErrorInvalidRequest", "unsupported")

    def _move(self, box, message, target):
        box.remove_from(message)
        message.folder = target
        box.bump(message)


class StateResource(resource.Resource):
    """``GET /_state``: per user, the ids of the unread, read and moved
    messages (JSON), for tests that run the service in another process."""

    isLeaf = True

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def render_GET(self, request):
        state = {}
        for user, box in self.graph.mailboxes.items():
            inbox = box.well_known["inbox"]
            state[user] = {
                "unread": sorted(m.id for m in box.messages.values()
                                 if m.folder == inbox and not m.is_read),
                "read": sorted(m.id for m in box.messages.values()
                               if m.folder == inbox and m.is_read),
                "elsewhere": sorted(m.id for m in box.messages.values() if m.folder != inbox),
            }
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"state": state, "token_requests": len(self.graph.tokens.requests)
                           if self.graph.tokens is not None else 0}).encode()


def serve(reactor, port, users, messages, size, client_id, client_secret, expires_in=3600,
          delay=0.0):
    """Token endpoint at ``/token``, Graph at ``/v1.0``, state at ``/_state``."""
    from tests.support.oauthserver import FakeTokenEndpoint

    tokens = FakeTokenEndpoint(clock=reactor, expires_in=expires_in)
    tokens.add_client(client_id, client_secret)
    graph = FakeGraph(tokens=tokens, clock=reactor)
    graph.delay = delay
    root = resource.Resource()
    root.putChild(b"token", tokens)
    root.putChild(b"v1.0", graph)
    root.putChild(b"_state", StateResource(graph))
    listening = reactor.listenTCP(port, server.Site(root), interface="127.0.0.1")
    graph.base_url = f"http://127.0.0.1:{listening.getHost().port}"
    for u in range(users):
        user = f"user{u:02d}@contoso.test"
        graph.mailbox(user)
        for n in range(messages):
            body = (f"Subject: {u}/{n}\r\nMessage-ID: <{u}.{n}@contoso.test>\r\n\r\n"
                    .encode() + b"x" * size)
            graph.add_message(user, body)
    return listening


def main(argv=None):
    import argparse

    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description="a fake token endpoint and Microsoft Graph")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--client-id", default="app-1")
    parser.add_argument("--client-secret", default="fake-secret")
    parser.add_argument("--expires-in", type=int, default=3600)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    serve(reactor, args.port, args.users, args.messages, args.size, args.client_id,
          args.client_secret, args.expires_in, args.delay)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
