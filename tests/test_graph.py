"""The Microsoft Graph source against the fake Graph service and the fake token
endpoint, in memory (treq's StubTreq) on a task.Clock."""

import base64
import email.utils
import os

import attr
import random
from urllib.parse import quote, quote_plus

from hypothesis import given, strategies as st
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from fido_tx import errors
from fido_tx.accounts.model import Account, OAuth
from fido_tx.credentials import oauth
from fido_tx.httpclient import HttpClient
from fido_tx.interfaces import ISource
from fido_tx.sources import graph, graphapi
from fido_tx.testing import MemorySink
from tests.support.graphserver import FakeGraph
from tests.support.oauthserver import FakeTokenEndpoint

USER = "support@contoso.test"
SECRET = "graph-app-secret-4321"


def mime(n, size=None):
    body = f"Subject: message {n}\r\nMessage-ID: <{n}@contoso.test>\r\n\r\nbody {n}\r\n".encode()
    if size:
        body += b"x" * (size - len(body))
    return body


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SourceContext:
    """The fields of :class:`fido_tx.sources.SourceContext` a Graph session uses."""

    reactor: object
    sink: object
    graph: object
    credentials: object
    dry_run: bool = False


class FakeRedis:
    """``execute(*args)`` over a dict: GET, SET, DEL."""

    def __init__(self):
        self.data = {}
        self.calls = []

    def execute(self, *args):
        self.calls.append(args)
        command, key = args[0].upper(), args[1]
        if command == "GET":
            return defer.succeed(self.data.get(key))
        if command == "SET":
            self.data[key] = args[2].encode() if isinstance(args[2], str) else args[2]
            return defer.succeed(b"OK")
        if command == "DEL":
            return defer.succeed(int(self.data.pop(key, None) is not None))
        raise AssertionError(args)


class Harness:
    def __init__(self, tmp, expires_in=3600, max_throttle_wait=120.0, **account):
        self.clock = task.Clock()
        self.tokens = FakeTokenEndpoint(clock=self.clock, expires_in=expires_in)
        self.tokens.add_client("app-1", SECRET)
        self.graph = FakeGraph(tokens=self.tokens, clock=self.clock)
        self.graph.mailbox(USER)
        root = Resource()
        root.putChild(b"token", self.tokens)
        root.putChild(b"v1.0", self.graph)
        self.stub = StubTreq(root)
        self.http = HttpClient(self.clock, http=self.stub)
        self.providers = oauth.Providers(self.clock, self.http,
                                         oauth.RefreshTokenStore.in_dir(tmp))
        self.sink = MemorySink()
        self.redis = FakeRedis()
        self.shared = graph.GraphShared(
            self.http, graphapi.Gates(self.clock), self.redis,
            graph.GraphSettings(max_throttle_wait=max_throttle_wait))
        self.dry_run = False
        fields = dict(id="contoso-support", source="graph", user=USER, mailbox="Inbox",
                      graph_endpoint="https://graph.test",
                      oauth=OAuth(provider="microsoft", client_id="app-1", client_secret=SECRET,
                                  token_url="https://login.test/token"))
        fields.update(account)
        self.account = Account(**fields)

    def add(self, n, **kw):
        return self.graph.add_message(USER, mime(n, **kw))

    def session(self):
        ctx = SourceContext(self.clock, self.sink, self.shared, self.credentials, self.dry_run)
        return graph.build(self.account, ctx)

    def credentials(self, account):
        return oauth.for_account(account, self.providers)

    def poll(self, step=0.1, limit=10000):
        session = self.session()
        box = []
        session.poll().addBoth(box.append)
        for _ in range(limit):
            self.stub.flush()
            if box:
                break
            self.clock.advance(step)
        assert box, "the session did not finish"
        return box[0]

    def unread(self, folder="inbox"):
        return [m.id for m in self.graph.messages_in(USER, folder) if not m.is_read]


class GraphTestCase(SynchronousTestCase):
    def harness(self, **kw):
        tmp = self.mktemp()
        os.makedirs(tmp)
        return Harness(tmp, **kw)


class ListingTests(GraphTestCase):
    def test_session_is_an_isource(self):
        h = self.harness()
        verifyObject(ISource, h.session())

    def test_three_pages_delivered_once_and_marked_read(self):
        h = self.harness()
        ids = [h.add(n) for n in range(120)]
        result = h.poll()
        self.assertIsNone(result.kind, result.message)
        self.assertEqual(result.fetched, 120)
        self.assertEqual(result.marked, 120)
        self.assertEqual(sorted(m.id for m in h.sink.entries), sorted(ids))
        self.assertEqual(h.unread(), [])
        listings = [q for _, method, path, q, _ in h.graph.log
                    if "/mailFolders/" in path and path.endswith("/messages")]
        self.assertEqual([q.get("$skip") for q in listings], [None, "50", "100"])
        self.assertEqual(listings[0]["$filter"], "isRead eq false")
        entry = h.sink.entries[0]
        self.assertEqual((entry.mailbox, entry.epoch, entry.source), ("Inbox", "", "graph"))
        self.assertTrue(entry.message_id.startswith("<m"))
        # immutable ids asked for on every request
        self.assertEqual({prefer for *_, prefer in h.graph.log}, {b'IdType="ImmutableId"'})
        again = h.poll()
        self.assertEqual((again.kind, again.fetched), (None, 0))

    def test_two_mebibyte_message_byte_identical(self):
        h = self.harness()
        raw = mime(1) + random.Random(7).randbytes(2 * 1024 * 1024)
        h.graph.add_message(USER, raw)
        result = h.poll()
        self.assertIsNone(result.kind, result.message)
        self.assertEqual(h.sink.entries[0].raw, raw)
        self.assertEqual(result.bytes, len(raw))

    def test_too_large_left_unread(self):
        h = self.harness()
        h.shared = attr.evolve(h.shared, settings=graph.GraphSettings(max_message_size=1000))
        big = h.add(1, size=5000)
        small = h.add(2)
        h.graph.mailbox(USER).messages[big].categories = ["Blue category"]
        result = h.poll()
        self.assertIsNone(result.kind, result.message)
        self.assertEqual(result.too_large, (big,))
        self.assertEqual([m.id for m in h.sink.entries], [small])
        self.assertEqual(h.unread(), [big])
        self.assertEqual(h.graph.mailbox(USER).messages[big].categories,
                         ["Blue category", "FidoTooLarge"])
        downloads = sum(1 for _, _, path, *_ in h.graph.log if path.endswith("$value"))
        again = h.poll()  # flagged: not downloaded again
        self.assertEqual((again.kind, again.too_large), (None, ()))
        self.assertEqual(downloads, sum(1 for _, _, path, *_ in h.graph.log
                                        if path.endswith("$value")))

    def test_at_most_four_requests_per_mailbox(self):
        h = self.harness()
        h.graph.delay = 1.0
        for n in range(20):
            h.add(n)
        result = h.poll()
        self.assertIsNone(result.kind, result.message)
        self.assertEqual(h.graph.most_in_flight[USER.lower()], 4)

    def test_folder_by_display_name_and_move(self):
        h = self.harness(mailbox="Tickets", after_fetch="move:Tickets/Done")
        box = h.graph.mailbox(USER)
        tickets = box.add_folder("Tickets", parent=None)
        box.add_folder("Done", parent=tickets)
        n1 = h.graph.add_message(USER, mime(1), folder=tickets)
        result = h.poll()
        self.assertIsNone(result.kind, result.message)
        self.assertEqual([m.id for m in h.sink.entries], [n1])
        moved = box.messages[n1]
        self.assertEqual(box.folders[moved.folder]["displayName"], "Done")
        self.assertEqual(h.sink.entries[0].mailbox, "Tickets")

    def test_delete(self):
        h = self.harness(after_fetch="delete")
        n1 = h.add(1)
        result = h.poll()
        self.assertEqual((result.kind, result.marked), (None, 1))
        self.assertEqual([m.id for m in h.graph.messages_in(USER, "deleteditems")], [n1])

    def test_missing_folder_is_mailbox_error(self):
        h = self.harness(mailbox="Nowhere")
        result = h.poll()
        self.assertEqual(result.kind, errors.MAILBOX)
        self.assertIn("Nowhere", result.message)

    def test_unknown_user_is_mailbox_error(self):
        h = self.harness(user="nobody@contoso.test")
        self.assertEqual(h.poll().kind, errors.MAILBOX)


class ExactlyOnceTests(GraphTestCase):
    def test_nothing_marked_unless_the_sink_confirmed(self):
        h = self.harness()
        ids = [h.add(n) for n in range(3)]
        h.sink.fail = errors.FidoError(errors.REDIS, "Redis is down")
        result = h.poll()
        self.assertEqual(result.kind, errors.REDIS)
        self.assertEqual(sorted(h.unread()), sorted(ids))
        self.assertFalse([m for _, m, *_ in h.graph.log if m in ("PATCH", "DELETE", "POST")])
        h.sink.fail = None
        result = h.poll()
        self.assertEqual((result.kind, result.fetched), (None, 3))
        self.assertEqual(h.unread(), [])

    def test_delivered_but_unmarked_is_marked_not_redelivered(self):
        h = self.harness()
        ids = [h.add(n) for n in range(3)]
        # a crash after the sink confirmed, before marking: the sink has them
        h.sink.deliver([graph.Message("contoso-support", "Inbox", "", i, b"x", source="graph")
                        for i in ids[:2]])
        result = h.poll()
        self.assertEqual((result.kind, result.fetched, result.marked), (None, 1, 3))
        self.assertEqual(len(h.sink.entries), 3)
        self.assertEqual(h.unread(), [])

    def test_rejected_left_unread_and_reported(self):
        h = self.harness()
        n1, n2 = h.add(1), h.add(2)
        h.sink.reject = {n1}
        result = h.poll()
        self.assertEqual(result.kind, errors.REJECTED)
        self.assertEqual(h.unread(), [n1])
        self.assertEqual(h.graph.mailbox(USER).messages[n1].categories, ["FidoRejected"])
        again = h.poll()  # left alone from now on
        self.assertEqual((again.kind, again.fetched), (None, 0))
        self.assertEqual(h.unread(), [n1])


class DeltaTests(GraphTestCase):
    def test_delta_then_410_resync_without_duplicates(self):
        h = self.harness(select="new", after_fetch="seen")
        first = [h.add(n) for n in range(25)]  # three delta pages of 10
        result = h.poll()
        self.assertEqual((result.kind, result.fetched), (None, 25))
        key = graph.delta_key(h.account)
        self.assertIn(b"$deltatoken=", h.redis.data[key])
        later = [h.add(n) for n in range(100, 103)]
        result = h.poll()
        self.assertEqual((result.kind, result.fetched), (None, 3))
        # the round lists the messages the last one marked read: no PATCH again
        patches = sum(1 for _, m, *_ in h.graph.log if m == "PATCH")
        self.assertEqual(patches, 28)
        quiet = h.poll()
        self.assertEqual((quiet.kind, quiet.fetched, quiet.marked), (None, 0, 0))
        self.assertEqual(sum(1 for _, m, *_ in h.graph.log if m == "PATCH"), 28)
        self.assertEqual(len(h.sink.entries), 28)
        # the service forgets the sync state: 410, a full resync, no duplicate
        h.graph.forget_delta_tokens(USER)
        h.add(200)
        result = h.poll()
        self.assertEqual((result.kind, result.fetched), (None, 1), result.message)
        self.assertTrue(any(path.endswith("/delta") and "$deltatoken" in q
                            for _, _, path, q, _ in h.graph.log))
        ids = [m.id for m in h.sink.entries]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(len(ids), 29)
        self.assertTrue(set(first + later) <= set(ids))

    def test_delta_takes_read_messages_too(self):
        h = self.harness(select="new", after_fetch="seen")
        n1 = h.add(1)
        h.graph.mailbox(USER).messages[n1].is_read = True
        self.assertEqual(h.poll().fetched, 1)

    def test_start_from_now_records_position_only(self):
        h = self.harness(select="new", start_from="now")
        for n in range(5):
            h.add(n)
        result = h.poll()
        self.assertEqual((result.kind, result.fetched), (None, 0))
        self.assertEqual(len(h.unread()), 5)
        fresh = h.add(9)
        result = h.poll()
        self.assertEqual(result.fetched, 1)
        self.assertEqual([m.id for m in h.sink.entries], [fresh])

    def test_unread_start_from_now_takes_only_later_mail(self):
        h = self.harness(start_from="now")
        for n in range(5):
            h.add(n)
        h.clock.advance(10)
        result = h.poll()
        self.assertEqual((result.kind, result.fetched), (None, 0))
        self.assertEqual(len(h.unread()), 5)
        self.assertIn(graph.since_key(h.account), h.redis.data)
        h.clock.advance(10)
        fresh = h.add(9)
        result = h.poll()
        self.assertEqual((result.kind, result.fetched), (None, 1), result.message)
        self.assertEqual([m.id for m in h.sink.entries], [fresh])
        self.assertEqual(len(h.unread()), 5)

    def test_delta_link_not_stored_when_delivery_failed(self):
        h = self.harness(select="new")
        h.add(1)
        h.sink.fail = errors.FidoError(errors.REDIS, "down")
        self.assertEqual(h.poll().kind, errors.REDIS)
        self.assertNotIn(graph.delta_key(h.account), h.redis.data)
        h.sink.fail = None
        self.assertEqual(h.poll().fetched, 1)


class ThrottlingAndTokenTests(GraphTestCase):
    def test_retry_after_obeyed(self):
        h = self.harness()
        h.add(1)
        h.graph.throttle(2, retry_after=3)
        result = h.poll(step=0.05)
        self.assertIsNone(result.kind, result.message)
        times = [t for t, *_ in h.graph.log]
        # the folder lookup was refused twice; each retry came 3 s later
        self.assertEqual(h.graph.codes[:3], [429, 429, 200])
        self.assertTrue(3.0 <= times[1] - times[0] < 3.11, times)
        self.assertTrue(3.0 <= times[2] - times[1] < 3.11, times)
        self.assertEqual(result.fetched, 1)

    def test_persistent_throttling_is_throttled(self):
        h = self.harness(max_throttle_wait=10)
        h.add(1)
        h.graph.throttle(100, retry_after=4)
        result = h.poll(step=0.5)
        self.assertEqual(result.kind, errors.THROTTLED)
        self.assertIn("429", result.message)
        self.assertEqual(len(h.graph.log), 3)  # at 0, 4 and 8 s; the next wait is past 10 s

    def test_token_expiring_mid_run_is_refreshed(self):
        h = self.harness(expires_in=20)
        h.graph.delay = 2.0  # each answer takes 2 s: the session outlives two tokens
        for n in range(40):
            h.add(n)
        result = h.poll()
        self.assertIsNone(result.kind, result.message)
        self.assertEqual(result.fetched, 40)
        self.assertGreaterEqual(len(h.tokens.requests), 3)
        self.assertNotIn(401, h.graph.codes)  # refreshed before expiry, never refused

    def test_revoked_token_refetched_once_on_401(self):
        h = self.harness()
        h.add(1)
        self.assertIsNone(h.poll().kind)
        h.tokens.access_tokens.clear()  # the service forgets every token
        h.add(2)
        result = h.poll()
        self.assertEqual((result.kind, result.fetched), (None, 1))
        self.assertEqual(len(h.tokens.requests), 2)

    def test_grant_revoked_is_reauthorize(self):
        h = self.harness(oauth=OAuth(provider="microsoft", client_id="app-1",
                                     refresh_token="rt-gone-0000", client_secret=SECRET,
                                     token_url="https://login.test/token"))
        result = h.poll()
        self.assertEqual(result.kind, errors.REAUTHORIZE)

    def test_no_secret_in_logs_or_results(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = self.harness(expires_in=30)
        for n in range(5):
            h.add(n)
        results = [h.poll()]
        h.tokens.access_tokens.clear()
        results.append(h.poll())
        h.graph.throttle(100, retry_after=100)
        results.append(h.poll())
        h.tokens.clients["app-1"] = "rotated-away"
        h.tokens.access_tokens.clear()
        h.clock.advance(3600)
        results.append(h.poll())
        self.assertEqual(results[-1].kind, errors.AUTH)
        secrets = [SECRET, "rotated-away"] + h.tokens.issued
        self.assertGreaterEqual(len(h.tokens.issued), 2)
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        text += "\n".join(repr(r) + r.message + r.debug for r in results)
        self.assertIn("contoso-support", text)
        for secret in secrets:
            for form in (secret, quote(secret, safe=""), quote_plus(secret),
                         base64.b64encode(secret.encode()).decode()):
                self.assertNotIn(form, text)



class RetryAfterParsingTests(SynchronousTestCase):
    def test_seconds_and_dates(self):
        now = 1_800_000_000.0
        self.assertEqual(graphapi.parse_retry_after("3", now), 3.0)
        self.assertEqual(graphapi.parse_retry_after(" 1.5 ", now), 1.5)
        self.assertEqual(graphapi.parse_retry_after("-4", now), 0.0)
        self.assertEqual(graphapi.parse_retry_after("99999", now), graphapi.MAX_RETRY_AFTER)
        date = email.utils.formatdate(now + 42, usegmt=True)
        self.assertAlmostEqual(graphapi.parse_retry_after(date, now), 42.0, places=0)
        for bad in (None, "", "soon", "nan", "Mon, 99 Foo"):
            self.assertIsNone(graphapi.parse_retry_after(bad, now))

    @given(st.text(max_size=60))
    def test_never_raises_and_is_bounded(self, value):
        seconds = graphapi.parse_retry_after(value, 1_800_000_000.0)
        self.assertTrue(seconds is None or 0.0 <= seconds <= graphapi.MAX_RETRY_AFTER)


class BatchTests(GraphTestCase):
    def test_batches_bounded_by_bytes_and_count(self):
        h = self.harness()
        h.shared = attr.evolve(h.shared, settings=graph.GraphSettings(
            batch_messages=10, batch_bytes=300_000))
        for n in range(6):
            h.add(n, size=100_000)  # 3 a batch by bytes (4 downloaded at a time)
        for n in range(6, 30):
            h.add(n)
        result = h.poll()
        self.assertEqual((result.kind, result.fetched), (None, 30))
        sizes = [len(ids) for call, *ids in h.sink.calls if call == "deliver"
                 for ids in ids]
        self.assertEqual(sum(sizes), 30)
        self.assertTrue(all(n <= 12 for n in sizes), sizes)
        self.assertEqual(sizes[0], 4)  # four 100 kB messages pass 300 kB


class SettingsTests(SynchronousTestCase):
    def test_sizes_follow_the_imap_section(self):
        from fido_tx.config import ImapSettings

        imap = ImapSettings(max_message_size=1234, batch_messages=7, batch_bytes=99,
                            session_timeout=60)
        made = graph.GraphSettings.from_imap(imap)
        self.assertEqual((made.max_message_size, made.batch_messages, made.batch_bytes,
                          made.session_timeout), (1234, 7, 99, 60))


class CrashTests(GraphTestCase):
    """A session cut at any moment (as by SIGKILL: requests in flight
    abandoned, nothing in memory kept), then run again: every message is
    delivered exactly once and ends up marked."""

    def cut_at(self, seconds, **account):
        h = self.harness(**account)
        h.graph.delay = 1.0
        ids = [h.add(n) for n in range(30)]
        box = []
        d = h.session().poll()
        d.addBoth(box.append)
        for _ in range(int(seconds * 10)):
            h.clock.advance(0.1)
            h.stub.flush()
        self.assertFalse(box, f"the session ended before the cut at {seconds} s")
        d.cancel()
        h.stub.flush()
        self.assertTrue(box, "the cut session did not end")
        self.assertEqual(box[0].kind, errors.TIMEOUT)
        h.at_cut = len(h.sink.entries)
        h.graph.delay = 0.0
        for _ in range(2):
            result = h.poll()
            self.assertIsNone(result.kind, result.message)
        delivered = [m.id for m in h.sink.entries]
        self.assertEqual(len(delivered), len(set(delivered)), f"duplicates at {seconds} s")
        self.assertEqual(sorted(delivered), sorted(ids), f"lost messages at {seconds} s")
        return h

    def test_cut_anywhere_unread_listing(self):
        partial = []
        for seconds in (0.5, 1.5, 2.5, 3.2, 4.5, 6.1, 8.5, 11.0, 15.5):
            h = self.cut_at(seconds)
            self.assertEqual(h.unread(), [], f"left unread at {seconds} s")
            partial.append(h.at_cut)
        self.assertEqual(partial[0], 0)
        self.assertTrue([n for n in partial if 0 < n < 30], partial)

    def test_cut_anywhere_delta_with_move(self):
        for seconds in (0.5, 2.5, 4.5, 6.1, 9.3, 14.0):
            h = self.cut_at(seconds, select="new", after_fetch="move:archive")
            self.assertEqual(h.graph.messages_in(USER, "inbox"), [], f"left at {seconds} s")

    def test_session_timeout_cuts_a_slow_session(self):
        h = self.harness()
        h.shared = attr.evolve(h.shared, settings=graph.GraphSettings(session_timeout=5))
        h.graph.delay = 10.0
        h.add(1)
        result = h.poll()
        self.assertEqual(result.kind, errors.TIMEOUT)
        self.assertIn("longer than 5 s", result.message)
        self.assertEqual(h.sink.entries, [])
