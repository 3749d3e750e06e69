"""The Microsoft Graph source (``"source": "graph"``): one poll of one folder.

A session (:class:`GraphSession`, an ``ISource``):

1. resolves the folder (``mailbox``, default ``Inbox``) and the ``move:``
   target once: well-known names (inbox, archive, deleteditems ...) or
   display names (``Parent/Child`` for a subfolder);
2. lists what is new: with ``select = "unseen"`` the unread messages
   (``$filter=isRead eq false``), with ``select = "new"`` the changes after
   the delta link kept in Redis (``fido:graph:delta:{<account>}:<folder>``;
   a 410 Gone drops it and starts a full resync, which the dedupe below keeps
   free of duplicates; ``start_from = "now"`` makes the first session only
   record where the folder stands); every listing follows ``@odata.nextLink``;
3. asks the sink which immutable ids are not delivered yet (epoch ``""``),
   downloads each one's MIME (``/messages/{id}/$value``) byte for byte,
   bounded by ``max_message_size`` (larger ones are left and named in
   ``too_large``), in batches, at most 4 requests at once per mailbox;
4. delivers each batch, then marks per ``after_fetch`` (PATCH isRead,
   DELETE, or POST move) only what the sink confirmed (and what it had
   confirmed before: a crash between the two is finished here);
5. stores the new delta link only after all that.

Nothing is marked in a dry run.  The session never fails: it ends with a
:class:`~fido_tx.outcome.SessionResult`.
"""

import json

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fido_tx import errors
from fido_tx.interfaces import ISource
from fido_tx.outcome import SessionResult
from fido_tx.redis import keys
from fido_tx.sinks.message import Message
from fido_tx.sources import graphapi
from fido_tx.timefmt import iso_utc

SOURCE = "graph"
LIST_SELECT = "id,internetMessageId,isRead,categories"
PAGE_SIZE = 50

log = Logger()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class GraphSettings:
    """Limits of Graph sessions (the IMAP section's sizes apply alike)."""

    max_message_size: int = 50 * 1024 * 1024
    #: a batch is delivered at this many messages or ``batch_bytes``, whichever
    #: comes first (a session holds at most a batch plus 4 messages)
    batch_messages: int = 25
    batch_bytes: int = 8 * 1024 * 1024
    #: category set on a message the application refused for good (then skipped)
    rejected_category: str = "FidoRejected"
    #: category set on a message over max_message_size (then skipped)
    too_large_category: str = "FidoTooLarge"
    @classmethod
    def from_imap(cls, imap):
        """The sizes of ``[imap]`` (:class:`fido_tx.config.ImapSettings`) for Graph too."""
        return cls(max_message_size=imap.max_message_size, batch_messages=imap.batch_messages,
                   batch_bytes=imap.batch_bytes, session_timeout=imap.session_timeout)

    #: seconds of Retry-After one request may wait in all before ``throttled``
    max_throttle_wait: float = 120.0
    #: longest a whole session may take
    session_timeout: float = 1800.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class GraphShared:
    """What every Graph session of a process shares: built once by the
    composition root (:meth:`create`), closed on stop (:meth:`close`).

    ``http``: :class:`fido_tx.httpclient.HttpClient` (one pool, per host);
    ``gates``: :class:`fido_tx.sources.graphapi.Gates` (4 requests per
    mailbox); ``redis``: an object with ``execute(*args) -> Deferred`` (the
    shared Redis connection) for the delta links, ``None``: not kept.
    """

    http: object
    gates: object
    redis: object = None
    settings: GraphSettings = attr.ib(factory=GraphSettings)

    @classmethod
    def create(cls, reactor, redis=None, settings=None, timeout=60.0):
        from fido_tx.httpclient import HttpClient

        return cls(HttpClient(reactor, timeout=timeout, per_host=graphapi.MAX_CONCURRENT),
                   graphapi.Gates(reactor), redis, settings or GraphSettings())

    def close(self):
        return self.http.close()


def delta_key(account):
    """The Redis key of the account's delta link (:mod:`fido_tx.redis.keys`)."""
    return keys.graph_delta(account.id, account.mailbox)


def since_key(account):
    """The Redis key of the time an unread-listing ``start_from = "now"``
    account started from."""
    return keys.graph_since(account.id, account.mailbox)


def build(account, ctx, handle=None):
    """The sources registry's factory (:data:`fido_tx.sources.SOURCES`).

    ``ctx`` is the :class:`fido_tx.sources.SourceContext`: its ``reactor``,
    ``sink``, ``credentials`` (``f(account) -> ICredentials``), ``dry_run``
    and ``graph`` (a :class:`GraphShared`).  ``handle`` is unused: a Graph
    session holds no connection between polls.
    """
    from fido_tx.sources import OnDemand

    shared = ctx.graph.get() if isinstance(ctx.graph, OnDemand) else ctx.graph
    return GraphSession(account, ctx.reactor, shared, ctx.sink,
                        ctx.credentials(account), dry_run=ctx.dry_run)


def _mebibytes(n):
    return f"{n / 1048576:.1f} MiB"


@implementer(ISource)
class GraphSession:
    """One poll of one Graph account (see the module)."""

    def __init__(self, account, reactor, shared, sink, credentials, dry_run=False):
        self.account = account
        self._reactor = reactor
        self._shared = shared
        self._settings = shared.settings
        self._sink = sink
        self._dry_run = dry_run
        self.credentials = credentials
        self.client = graphapi.GraphClient(
            reactor, shared.http, credentials, account.graph_endpoint, account.user,
            shared.gates.for_mailbox(account.graph_endpoint, account.user),
            shared.settings.max_throttle_wait)
        self._counts = dict(fetched=0, bytes=0, marked=0)
        self._too_large = []
        self._rejected = []
        self._read = set()
        self._categories = {}

    def poll(self):
        started = self._reactor.seconds()
        run = defer.ensureDeferred(self._run())
        stopped = []  # why the session was cut short: "timeout" or "cancelled"

        def stop(why):
            stopped.append(why)
            run.cancel()

        d = defer.Deferred(lambda _: stop("cancelled"))
        timer = None
        if self._settings.session_timeout:
            timer = self._reactor.callLater(self._settings.session_timeout, stop, "timeout")

        def finished(result):
            if timer is not None and timer.active():
                timer.cancel()
            error = None if not isinstance(result, Failure) else self._failed(result, stopped)
            if not d.called:
                d.callback(self._result(error, started))

        run.addBoth(finished)
        return d

    def _failed(self, failure, stopped=()):
        if stopped:
            # whatever a cut request raised, the session was cut short
            if stopped[0] == "timeout":
                return errors.FidoError(errors.TIMEOUT, "the Graph session took longer than"
                                        f" {self._settings.session_timeout:g} s")
            return errors.FidoError(errors.TIMEOUT, "the Graph session was stopped")
        if failure.check(errors.FidoError):
            return failure.value
        if failure.check(graphapi.Gone):
            return errors.FidoError(errors.PROTOCOL, str(failure.value))
        log.failure("Graph session of {account_id} failed unexpectedly", failure,
                    account_id=self.account.id)
        return errors.FidoError(errors.PROTOCOL, f"unexpected error: {failure.type.__name__}")

    def _result(self, error, started):
        seconds = max(0.0, self._reactor.seconds() - started)
        kind = error.kind if error is not None else None
        message = self._scrub(error.message) if error is not None else ""
        debug = self._scrub(error.debug) if error is not None else ""
        if error is None and self._rejected:
            kind, message = errors.REJECTED, (
                f"the application refused {len(self._rejected)} message(s) for good;"
                " they are left unread in the folder")
        c = self._counts
        # the status side logs the one line per session; this adds Graph's detail
        log.debug("graph {account_id} {folder}: {fetched} new, {size}, {marked} marked,"
                 " {throttled:g} s throttled, {seconds:.2f} s{outcome}",
                 account_id=self.account.id, folder=self.account.mailbox, fetched=c["fetched"],
                 size=_mebibytes(c["bytes"]), marked=c["marked"],
                 throttled=self.client.throttled_seconds, seconds=seconds,
                 outcome=f": {kind}: {message}" if kind else "")
        return SessionResult(self.account.id, kind=kind, message=message, debug=debug,
                             fetched=c["fetched"], bytes=c["bytes"], marked=c["marked"],
                             too_large=tuple(self._too_large), seconds=seconds,
                             dry_run=self._dry_run,
                             retry_after=error.retry_after if error is not None else None)

    def _scrub(self, text):
        for form in self.credentials.secret_forms():
            if len(form) >= 4:
                text = text.replace(form, "<redacted>")
        return text

    async def _run(self):
        account = self.account
        folder = await self.client.folder_id(account.mailbox)
        target = None
        if account.move_target and not self._dry_run:
            target = await self.client.folder_id(account.move_target)
        if account.select == "new":
            listed, delta_link = await self._list_delta(folder)
        else:
            listed, delta_link = await self._list_unread(folder), None
        if listed:
            await self._fetch(listed, target)
        if delta_link is not None and self._shared.redis is not None and not self._dry_run:
            await self._shared.redis.execute("SET", delta_key(account), delta_link)

    async def _since(self):
        """``start_from = "now"`` with unread listing: the time kept in Redis
        (``fido:graph:since:...``), or ``None`` after recording now (the first
        session fetches nothing)."""
        key = since_key(self.account)
        stored = await self._shared.redis.execute("GET", key)
        if stored:
            return stored.decode("ascii") if isinstance(stored, bytes) else stored
        if not self._dry_run:
            await self._shared.redis.execute("SET", key, iso_utc(self._reactor.seconds()))
        return None

    async def _list_unread(self, folder):
        """The unread messages of ``folder``; ``None`` when this session only
        records the start (``start_from = "now"``)."""
        condition = "isRead eq false"
        if self.account.start_from == "now" and self._shared.redis is not None:
            since = await self._since()
            if since is None:
                return None
            condition += f" and receivedDateTime ge {since}"
        found = []
        params = {"$filter": condition, "$select": LIST_SELECT, "$top": str(PAGE_SIZE)}
        await self.client.pages(
            self.client.url(f"/mailFolders/{folder}/messages", params),
            lambda doc: found.extend(doc.get("value") or []))
        return _unique(found)

    async def _list_delta(self, folder):
        """``(messages, delta link)`` after the stored link (a full resync on 410)."""
        stored = None
        if self._shared.redis is not None:
            stored = await self._shared.redis.execute("GET", delta_key(self.account))
            if isinstance(stored, bytes):
                stored = stored.decode("utf-8")
        initial = self.client.url(f"/mailFolders/{folder}/messages/delta",
                                  {"$select": LIST_SELECT})
        url = stored or initial
        try:
            found, link = await self._delta_round(url)
        except graphapi.Gone:
            if not stored:
                raise
            log.info("graph {account_id}: the delta link expired (410); resynchronising the"
                     " folder (delivered messages are not delivered again)",
                     account_id=self.account.id)
            await self._shared.redis.execute("DEL", delta_key(self.account))
            stored = None
            found, link = await self._delta_round(initial)
        if not stored and self.account.start_from == "now":
            return None, link  # the first session only records where the folder stands
        return found, link

    async def _delta_round(self, url):
        found = []

        def page(doc):
            found.extend(m for m in doc.get("value") or [] if "@removed" not in m)

        last = await self.client.pages(url, page)
        link = last.get("@odata.deltaLink")
        if not isinstance(link, str) or not link.startswith(self.client.base):
            raise errors.FidoError(errors.PROTOCOL, "Microsoft Graph ended a delta round without"
                                   " an @odata.deltaLink")
        return _unique(found), link

    async def _fetch(self, listed, target):
        account = self.account
        skip = {self._settings.rejected_category, self._settings.too_large_category}
        listed = [m for m in listed if not skip.intersection(m.get("categories") or ())]
        self._categories = {m["id"]: list(m.get("categories") or ()) for m in listed}
        ids = [m["id"] for m in listed]
        message_ids = {m["id"]: m.get("internetMessageId") or "" for m in listed}
        # "seen" needs no PATCH for a message already read: a delta round lists
        # the messages the last round marked (a change), and marking them again
        # would make them a change again, for ever
        self._read = {m["id"] for m in listed if m.get("isRead") is True}
        new = await self._sink.filter_new(account.id, account.mailbox, "", ids)
        new_set = set(new)
        before = [i for i in ids if i not in new_set]
        if before and not self._dry_run:
            await self._mark(before, target)  # delivered earlier, not marked yet
        pending = []
        for group in _batches(new, graphapi.MAX_CONCURRENT):
            pending += await self._download(group, message_ids)
            if (len(pending) >= self._settings.batch_messages
                    or sum(m.size for m in pending) >= self._settings.batch_bytes):
                await self._deliver(pending, target)
                pending = []
        if pending:
            await self._deliver(pending, target)
        if not self._dry_run:
            await self._flag(self._too_large, self._settings.too_large_category)

    async def _flag(self, ids, category):
        """Add ``category`` to each message (left on the server, skipped from now on)."""
        def one(message_id):
            categories = self._categories.get(message_id, []) + [category]
            return self.client.send(b"PATCH", self.client.url(f"/messages/{message_id}"),
                                    json.dumps({"categories": categories}).encode())

        if ids:
            await defer.gatherResults([one(i) for i in ids], consumeErrors=True) \
                .addErrback(lambda f: f.value.subFailure)

    async def _deliver(self, messages, target):
        """Deliver one batch, then mark what the sink confirmed."""
        if self._dry_run:
            self._counts["fetched"] += len(messages)
            return
        delivery = await self._sink.deliver(messages)
        sizes = {m.id: m.size for m in messages}
        self._counts["fetched"] += len(delivery.new)
        self._counts["bytes"] += sum(sizes.get(i, 0) for i in delivery.new)
        self._rejected.extend(delivery.rejected)
        await self._mark(list(delivery.confirmed), target)
        await self._flag(delivery.rejected, self._settings.rejected_category)
        if delivery.error is not None:
            raise delivery.error

    async def _download(self, batch, message_ids):
        limit = self._settings.max_message_size

        def one(message_id):
            d = self.client.send(b"GET", self.client.url(f"/messages/{message_id}/$value"),
                                 max_body=limit)

            def too_large(failure):
                failure.trap(errors.FidoError)
                if failure.value.kind != errors.TOO_LARGE:
                    return failure
                self._too_large.append(message_id)
                return None

            return d.addErrback(too_large)

        responses = await defer.gatherResults([one(i) for i in batch], consumeErrors=True) \
            .addErrback(lambda f: f.value.subFailure)
        return [Message(self.account.id, self.account.mailbox, "", i, r.body,
                        message_id=message_ids.get(i, ""), source=SOURCE)
                for i, r in zip(batch, responses) if r is not None]

    async def _mark(self, ids, target):
        how = self.account.after_fetch
        if how == "seen":
            ids = [i for i in ids if i not in self._read]
        if not ids:
            return

        def one(message_id):
            path = self.client.url(f"/messages/{message_id}")
            if how == "seen":
                return self.client.send(b"PATCH", path, json.dumps({"isRead": True}).encode())
            if how == "delete":
                return self.client.send(b"DELETE", path, ok=(204, 200, 404))
            return self.client.send(b"POST", path + "/move",
                                    json.dumps({"destinationId": target}).encode(),
                                    ok=(201, 200))

        await defer.gatherResults([one(i) for i in ids], consumeErrors=True) \
            .addErrback(lambda f: f.value.subFailure)
        self._counts["marked"] += len(ids)


def _unique(listed):
    seen, out = set(), []
    for m in listed:
        if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"] not in seen:
            seen.add(m["id"])
            out.append(m)
    return out


def _batches(items, size):
    size = max(1, int(size))
    for start in range(0, len(items), size):
        yield items[start:start + size]


async def _look(client, account):
    folder = await client.folder_id(account.mailbox)
    document = await client.get_json(client.url(f"/mailFolders/{folder}"))
    unread = document.get("unreadItemCount")
    if account.move_target:
        await client.folder_id(account.move_target)
    return unread if isinstance(unread, int) else 0


def check_account(reactor, account, shared, credentials):
    """``fido check --connect`` for a Graph account: a token, the folder (and
    the ``move:`` target) found, its unread count read; nothing fetched or
    changed.  Fires with a :class:`SessionResult` (``fetched`` = unread)."""
    client = graphapi.GraphClient(reactor, shared.http, credentials, account.graph_endpoint,
                                  account.user,
                                  shared.gates.for_mailbox(account.graph_endpoint, account.user),
                                  max_throttle_wait=10.0)
    started = reactor.seconds()
    d = defer.ensureDeferred(_look(client, account))

    def done(unread):
        return SessionResult(account.id, fetched=unread, dry_run=True,
                             seconds=reactor.seconds() - started)

    def failed(failure):
        error = failure.value if failure.check(errors.FidoError) else errors.FidoError(
            errors.PROTOCOL, f"unexpected error: {failure.type.__name__}")
        text = error.message
        for form in credentials.secret_forms():
            if len(form) >= 4:
                text = text.replace(form, "<redacted>")
        return SessionResult(account.id, kind=error.kind, message=text, dry_run=True,
                             seconds=reactor.seconds() - started)

    return d.addCallbacks(done, failed)
