"""``kind = "webhook"``: POST each message to the application, as mail_room's
postback delivery does for GitLab (body = the raw message, ``Content-Type:
text/plain``), but counting only a 2xx answer as delivered.

* ``auth``: ``gitlab-jwt`` (the ``Gitlab-Mailroom-Api-Request`` header, an
  HS256 JWT keyed with the base64-decoded ``secret_file``), ``bearer``
  (``token_file``), ``basic`` (``username`` + ``password_file``) or ``none``.
* Every POST carries ``Idempotency-Key`` (the same for the same message key,
  on every retry, from every instance) and ``X-Fido-Route-Key`` when the
  message has a route key.
* Answers: 2xx delivered; 401/403 a configuration problem (kind
  ``delivery``: check the secret or token); 408, 5xx, redirects, timeouts
  and refused connections are transient (kind ``delivery``, the message
  stays unmarked and is retried with backoff); any other 4xx is a permanent
  refusal (the id goes to ``Delivery.rejected``).
* 429 is kind ``throttled``: nothing of it is marked, and the error carries
  the answer's ``Retry-After`` (delta-seconds or an HTTP date, at most
  ``MAX_RETRY_AFTER``), which the scheduler waits instead of the backoff
  (bounded by the backoff maximum).  Until then the delivery sends nothing
  more for any account (each batch ends ``throttled`` at once), so a
  throttled application is not hit by every account in turn; without a
  Retry-After the window is ``THROTTLE_DEFAULT`` seconds.  The account's
  state change is reported once, as every kind is.
* Exactly once: ids already in the dedupe set
  (``fido:uids:{<account>}:<epoch>:<mailbox>``, shared with the Redis sinks)
  are confirmed without a POST, and so are messages whose identity was
  stored before under another key (:mod:`fido_tx.sinks.identity`); after a
  2xx the id is added to the set (with its identity) *before* it is
  confirmed, so a crash in between repeats at most that one POST, with the
  same ``Idempotency-Key``.
* At most ``concurrency`` requests of this delivery run at once, each under a
  deadline of ``timeout`` seconds over the whole exchange (connect, headers
  and body), on the delivery's own persistent connection pool: an
  application that is down or hangs costs each batch at most the deadline
  and never holds up another delivery or the IMAP side.
"""

import hashlib
from urllib.parse import urlsplit

import attr
from twisted.application.service import Service
from twisted.internet import defer, endpoints, error as neterror, protocol
from twisted.logger import Logger
from twisted.web import client as webclient
from twisted.web.http_headers import Headers
from zope.interface import implementer

from fido_tx import errors
from fido_tx.httpclient import parse_retry_after
from fido_tx.interfaces import ISink
from fido_tx.redis import keys
from fido_tx.sinks import identity, jwt, redisbatch
from fido_tx.sinks.message import Delivery
from fido_tx.sinks.options import one_of, read_secret_file, resolve_path, typed

KIND = "webhook"

OPTIONS = {
    "url": None,
    "auth": "none",
    "secret_file": "",
    "token_file": "",
    "username": "",
    "password_file": "",
    "timeout": 30.0,
    "concurrency": 4,
    "idempotency": True,
    "content_type": "text/plain",
    "jwt_issuer": jwt.GITLAB_ISSUER,
    "jwt_header": jwt.GITLAB_HEADER,
}

AUTH_KINDS = ("gitlab-jwt", "bearer", "basic", "none")

#: before the POSTs: KEYS = the dedupe set, the identity hash and list;
#: ARGV = the epoch, then (id, identity) pairs.  Returns the ids to POST: not
#: in the set and of an identity not stored before (those are recorded under
#: their new key now, and confirmed without a POST).
FRESH_LUA = identity.LUA + """
local fresh = {}
for i = 2, #ARGV, 2 do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then
    if fido_known(KEYS[2], ARGV[i + 1]) then
      redis.call('SADD', KEYS[1], ARGV[i])
      fido_remember(KEYS[2], KEYS[3], ARGV[1] .. ':' .. ARGV[i], ARGV[i + 1])
    else
      fresh[#fresh + 1] = ARGV[i]
    end
  end
end
return fresh
"""

#: after the 2xx answers: KEYS = the dedupe set, the account hash, the
#: identity hash and list; ARGV = the epoch, then (id, identity) pairs: the
#: ids into the set with their identities, the new ones counted into the
#: account hash's fetched_total
RECORD_LUA = identity.LUA + """
local new = 0
for i = 2, #ARGV, 2 do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    new = new + 1
    fido_remember(KEYS[3], KEYS[4], ARGV[1] .. ':' .. ARGV[i], ARGV[i + 1])
  end
end
if new > 0 then
  redis.call('HINCRBY', KEYS[2], 'fetched_total', new)
end
return new
"""

#: bytes of an answer's body kept for the debug text (the rest is drained)
BODY_KEEP = 2048

#: a 429's Retry-After is taken as at most this (seconds)
MAX_RETRY_AFTER = 3600.0
#: seconds the delivery pauses after a 429 without a (readable) Retry-After
THROTTLE_DEFAULT = 30.0

_log = Logger()


def validate(options, base_dir):
    """Check a ``[delivery.NAME]`` table of kind webhook; resolve its paths.

    Reads the secret files to check them (a GitLab secret must decode to 32
    bytes) but returns only their paths: secrets stay out of the settings."""
    o = typed(options, OPTIONS)
    url = urlsplit(o["url"])
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"url: must be an http:// or https:// URL, got {_show_url(o['url'])!r}")
    one_of("auth", o["auth"], AUTH_KINDS)
    if o["timeout"] <= 0:
        raise ValueError(f"timeout: must be greater than 0, got {o['timeout']!r}")
    if o["concurrency"] < 1:
        raise ValueError(f"concurrency: must be at least 1, got {o['concurrency']!r}")
    for key in ("secret_file", "token_file", "password_file"):
        o[key] = resolve_path(o[key], base_dir)
    needs = {"gitlab-jwt": ("secret_file",), "bearer": ("token_file",),
             "basic": ("username", "password_file"), "none": ()}[o["auth"]]
    for key in needs:
        if not o[key]:
            raise ValueError(f'{key}: required with auth = "{o["auth"]}"')
    if o["auth"] == "gitlab-jwt":
        try:
            jwt.read_gitlab_secret(o["secret_file"])
        except ValueError as e:
            raise ValueError(f"secret_file: {e}") from None
    elif o["auth"] == "bearer":
        read_secret_file("token_file", o["token_file"])
    elif o["auth"] == "basic":
        read_secret_file("password_file", o["password_file"])
    return o


def build(name, options, ctx):
    """The sink for validated ``options`` (see :func:`validate`)."""
    return WebhookSink(
        name,
        options,
        reactor=ctx.reactor,
        redis=ctx.redis,
        dry_run=ctx.dry_run,
        log=getattr(ctx, "log", None) or _log,
    )


def idempotency_key(key):
    """The ``Idempotency-Key`` of a :class:`~fido_tx.sinks.message.MessageKey`:
    stable across retries, restarts and instances."""
    text = "\0".join((key.account, key.mailbox, key.epoch, key.id))
    return "fido-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _show_url(url):
    """``url`` without user information (a password may hide there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return f"{parts.scheme}://{host}{parts.path}"
    except ValueError:
        return "<unparsable URL>"


class _Auth:
    """The authentication headers of one request (secrets read at build)."""

    def __init__(self, options, clock):
        self.kind = options["auth"]
        self._clock = clock
        self._header = options["jwt_header"].encode("latin-1")
        self._issuer = options["jwt_issuer"]
        self._fixed = None
        if self.kind == "gitlab-jwt":
            self._key = jwt.read_gitlab_secret(options["secret_file"])
        elif self.kind == "bearer":
            token = read_secret_file("token_file", options["token_file"])
            self._fixed = (b"Authorization", b"Bearer " + token.encode("utf-8"))
        elif self.kind == "basic":
            import base64

            password = read_secret_file("password_file", options["password_file"])
            pair = f"{options['username']}:{password}".encode("utf-8")
            self._fixed = (b"Authorization", b"Basic " + base64.b64encode(pair))

    def __repr__(self):
        return f"<_Auth {self.kind}>"

    def headers(self):
        if self.kind == "gitlab-jwt":
            token = jwt.gitlab_token(self._key, self._clock.seconds(), self._issuer)
            return [(self._header, token.encode("ascii"))]
        return [self._fixed] if self._fixed else []


class _Drain(protocol.Protocol):
    """Reads an answer's body (keeping its first bytes) so that the
    connection goes back to the pool; cancelled, it aborts the connection."""

    def __init__(self):
        self.finished = None
        self.kept = []
        self.size = 0

    def dataReceived(self, data):
        if self.size < BODY_KEEP:
            self.kept.append(data[: BODY_KEEP - self.size])
        self.size += len(data)

    def connectionLost(self, reason):
        if not self.finished.called:
            self.finished.callback(b"".join(self.kept))

    def abort(self, _d):
        if self.transport is not None:
            self.transport.stopProducing()


def _read_body(response):
    drain = _Drain()
    drain.finished = finished = defer.Deferred(drain.abort)
    response.deliverBody(drain)
    return finished


@implementer(webclient.IAgentEndpointFactory)
class _CachedEndpoints:
    """Agent's standard endpoints, made once per (scheme, host, port): the
    standard factory builds (and IDNA-encodes) a new one for every request,
    which was most of a POST's client CPU in bench/deliver.py."""

    def __init__(self, reactor, connect_timeout):
        self._reactor = reactor
        self._timeout = connect_timeout
        from fido_tx.httpstls import HttpsPolicy

        # one OpenSSL context for every host, not one (CA bundle loaded) each
        self._tls = HttpsPolicy()
        self._endpoints = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._make(uri)
        return endpoint

    def _make(self, uri):
        host = uri.host.decode("ascii")
        tcp = endpoints.HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            from fido_tx.lazytls import wrap_client_tls

            return wrap_client_tls(self._tls.creatorForNetloc(uri.host, uri.port), tcp)
        return tcp


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Answer:
    """What became of one POST: ``status`` (0 when no answer came),
    ``failure`` text for the no-answer case, ``body`` start."""

    status: int = 0
    failure: str = ""
    body: bytes = b""
    retry_after: str = ""


@implementer(ISink)
class WebhookSink(Service):
    """One ``[delivery.NAME]`` of kind webhook (a Service: stopping it
    closes the connection pool)."""

    kind = KIND

    def __init__(self, name, options, reactor, redis, dry_run=False, log=None, agent=None):
        # not Service.name: a delivery may be called "redis" like the connection
        self.delivery = name
        self.url = options["url"]
        self._shown_url = _show_url(self.url)
        self._options = options
        self._reactor = reactor
        self._redis = redis
        self._record = redis.script(RECORD_LUA) if redis is not None else None
        self._fresh = redis.script(FRESH_LUA) if redis is not None else None
        self._recognise = redis.script(identity.RECOGNISE_LUA) if redis is not None else None
        self._unrecorded = identity.Unrecorded()
        self._dry_run = dry_run
        self._log = log or _log
        self._auth = _Auth(options, reactor)
        self._timeout = options["timeout"]
        self._limit = defer.DeferredSemaphore(options["concurrency"])
        #: clock seconds until which a 429 asked us to send nothing
        self._throttled_until = None
        self._pool = webclient.HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = options["concurrency"]
        self._agent = agent or webclient.Agent.usingEndpointFactory(
            reactor, _CachedEndpoints(reactor, self._timeout), pool=self._pool
        )

    def stopService(self):
        super().stopService()
        return self._pool.closeCachedConnections()

    # -- ISink

    def filter_new(self, account_id, mailbox, epoch, ids):
        # no WAIT for replicas: a record lost in a failover costs one more
        # POST with the same Idempotency-Key, never a message
        return redisbatch.filter_new(self._redis, account_id, mailbox, epoch, ids,
                                     unrecorded=self._unrecorded)

    def identities(self, account_id, mailbox, epoch, ids):
        return identity.stored(self._redis, account_id, mailbox, epoch, ids)

    def may_recognise(self, account_id, mailbox, epoch):
        """False when the last ``filter_new`` found no identity recorded,
        or ``epoch`` recorded as checked already."""
        return not self._unrecorded.checked(account_id, mailbox, epoch)

    def recognise(self, account_id, mailbox, epoch, identities):
        return identity.recognise(self._recognise, account_id, mailbox, epoch, identities,
                                  unrecorded=self._unrecorded)

    def _not_delivered(self, account, mailbox, epoch, group):
        """The ids of ``group`` to POST (see :data:`FRESH_LUA`)."""
        args = [epoch.encode("utf-8")]
        for m in group:
            args += [m.id.encode("utf-8"), m.identity.encode("utf-8")]
        d = self._fresh.run([keys.dedupe(account, mailbox, epoch),
                             *keys.identities(account, mailbox)], args,
                            what=f"dedupe check of {len(group)} messages")
        return d.addCallback(lambda ids: [i.decode("utf-8") if isinstance(i, bytes) else i
                                          for i in ids or ()])

    def deliver(self, messages):
        messages = list(messages)
        if not messages:
            return defer.succeed(Delivery())
        if self._dry_run:
            self._log.info(
                "webhook {name}: dry run, {n} messages not posted", name=self.delivery, n=len(messages)
            )
            return defer.succeed(Delivery())
        return defer.ensureDeferred(self._deliver(messages))

    async def _deliver(self, messages):
        groups = {}
        for m in messages:
            groups.setdefault((m.account, m.mailbox, m.epoch), []).append(m)
        confirmed, new, rejected, errs = [], [], [], []
        for (account, mailbox, epoch), group in groups.items():
            try:
                fresh = await self._not_delivered(account, mailbox, epoch, group)
            except errors.FidoError as e:
                errs.append(e)
                continue
            fresh_set = set(fresh)
            confirmed.extend(m.id for m in group if m.id not in fresh_set)
            todo = [m for m in group if m.id in fresh_set]
            waiting = self._throttled()
            if todo and waiting is not None:
                errs.append(waiting)
                continue
            answers = await defer.gatherResults(
                [self._limit.run(self._post, m) for m in todo], consumeErrors=True
            )
            done = []
            for m, answer in zip(todo, answers):
                verdict = self._judge(m, answer)
                if verdict == "ok":
                    done.append(m.id)
                elif verdict == "rejected":
                    rejected.append(m.id)
                else:
                    errs.append(verdict)
            if done:
                identities = {m.id: m.identity for m in todo}
                args = [epoch.encode("utf-8")]
                for i in done:
                    args += [i.encode("utf-8"), identities[i].encode("utf-8")]
                try:
                    await self._record.run(
                        [keys.dedupe(account, mailbox, epoch), keys.account(account),
                         *keys.identities(account, mailbox)], args,
                        what=f"record of {len(done)} webhook deliveries")
                except errors.FidoError as e:
                    errs.append(e)
                    continue
                confirmed.extend(done)
                new.extend(done)
        return Delivery(tuple(confirmed), tuple(new), tuple(rejected), errs[0] if errs else None)


    # -- one request

    def _headers(self, message):
        headers = Headers()
        headers.addRawHeader(b"Content-Type", self._options["content_type"].encode("latin-1"))
        headers.addRawHeader(b"User-Agent", b"fido")
        for name, value in self._auth.headers():
            headers.addRawHeader(name, value)
        if self._options["idempotency"]:
            headers.addRawHeader(b"Idempotency-Key", idempotency_key(message.key).encode("ascii"))
        if message.route_key:
            headers.addRawHeader(b"X-Fido-Route-Key", message.route_key.encode("utf-8"))
        return headers

    def _post(self, message):
        """Deferred :class:`_Answer` of one POST, never failing."""
        body = _Bytes(message.raw)
        d = self._agent.request(b"POST", self.url.encode("ascii"), self._headers(message), body)

        def answered(response):
            wait = (response.headers.getRawHeaders(b"retry-after") or [b""])[0]
            return _read_body(response).addCallback(
                lambda data: _Answer(status=response.code, body=data,
                                     retry_after=wait.decode("latin-1")[:40])
            )

        d.addCallback(answered)
        expired = []

        def deadline():
            expired.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._timeout, deadline)

        def settled(result):
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(settled)
        return d.addErrback(self._no_answer, expired)

    def _no_answer(self, failure, expired=()):
        if expired:
            return _Answer(failure=f"no complete answer within {self._timeout:g} s")
        if failure.check(neterror.ConnectionRefusedError):
            return _Answer(failure="connection refused (is the application running?)")
        if failure.check(neterror.DNSLookupError):
            return _Answer(failure="host name not found")
        if failure.check(webclient.ResponseNeverReceived, webclient.ResponseFailed):
            reasons = getattr(failure.value, "reasons", None) or [failure]
            return _Answer(failure="connection lost: " + _one_line(reasons[0].getErrorMessage()))
        return _Answer(failure=_one_line(failure.getErrorMessage()) or failure.type.__name__)

    def _throttled(self):
        """The ``throttled`` error while a 429's window lasts, else ``None``."""
        until = self._throttled_until
        left = None if until is None else until - self._reactor.seconds()
        if left is None or left <= 0:
            return None
        return errors.FidoError(
            errors.THROTTLED, f"webhook {self.delivery} ({self._shown_url}) asked for a pause"
            f" (429); sending again in {left:.0f} s", retry_after=left)

    def _throttle(self, answer, where, debug):
        """A 429: the window, and its error."""
        now = self._reactor.seconds()
        seconds = parse_retry_after(answer.retry_after or None, now, MAX_RETRY_AFTER)
        told = seconds is not None
        if seconds is None:
            seconds = THROTTLE_DEFAULT
        until = now + seconds
        if self._throttled_until is None or until > self._throttled_until:
            self._throttled_until = until
        said = f"Retry-After: {answer.retry_after}" if told else "no Retry-After"
        return errors.FidoError(
            errors.THROTTLED, f"{where} answered 429 ({said}): nothing marked; this delivery"
            f" sends again in {seconds:.0f} s", debug, retry_after=seconds)

    def _judge(self, message, answer):
        """"ok", "rejected", or the FidoError that keeps ``message`` back."""
        status = answer.status
        where = f"webhook {self.delivery} ({self._shown_url})"
        debug = f"message {message.account}/{message.mailbox}/{message.epoch}/{message.id}"
        if answer.body:
            debug += "; answer: " + answer.body[:500].decode("utf-8", "replace")
        if 200 <= status < 300:
            return "ok"
        if status in (401, 403):
            what = {"gitlab-jwt": "secret_file (GitLab's .gitlab_mailroom_secret)",
                    "bearer": "token_file", "basic": "username and password_file",
                    "none": "auth setting (the application wants credentials)"}[self._auth.kind]
            return errors.FidoError(
                errors.DELIVERY, f"{where} answered {status}: check the {what}", debug
            )
        if status == 0:
            return errors.FidoError(
                errors.DELIVERY, f"{where}: {answer.failure}; will retry", debug
            )
        if status == 429:
            return self._throttle(answer, where, debug)
        if status == 408 or status >= 500 or 300 <= status < 400:
            hint = "; check the url" if 300 <= status < 400 else "; will retry"
            if answer.retry_after:
                hint = f" (Retry-After: {answer.retry_after}){hint}"
            return errors.FidoError(errors.DELIVERY, f"{where} answered {status}{hint}", debug)
        self._log.warn(
            "{where} refused {account}/{mailbox} uid {id} for good ({status}):"
            " flagged on the server and left there",
            where=where, account=message.account, mailbox=message.mailbox,
            id=message.id, status=status,
        )
        return "rejected"


def _one_line(text):
    return " ".join(str(text).split())


@implementer(webclient.IBodyProducer)
class _Bytes:
    """The request body: the message, in memory, written at once."""

    def __init__(self, data):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass
