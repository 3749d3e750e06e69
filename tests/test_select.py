"""select = "new" and start_from = "now" for IMAP (fido_tx.sources.imap.select,
fido_tx.redis.positions): the choice of UIDs alone, then whole polls against
the mock IMAP server over loopback, then the Redis record on a real Redis."""

import attr
import pytest
import pytest_twisted
from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet import defer, reactor
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.config import ImapSettings
from fido_tx.sources.imap.client import ImapCommandError
from fido_tx.sources.imap.parse import SelectInfo
from fido_tx.sources.imap.select import MAX_UID, Selection
from fido_tx.sources.imap.session import fetch_mailbox
from fido_tx.testing import MemoryPositions, MemorySink
from tests.support.mockimap import Behaviour, Fault, MockIMAPServer, MockMailbox, sample_message

PASSWORD = "secret-pw"


def _account(**kw):
    return Account(id="a1", host="127.0.0.1", username="u", password=PASSWORD, **kw)


class Commands:
    """A fake ``command(name, args, untagged=...)``: answers from a table."""

    def __init__(self, answers=None):
        self.answers = answers or {}
        self.sent = []

    def __call__(self, name, args=None, untagged=None):
        self.sent.append((name, args))
        answer = self.answers.get(name)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        for segments in answer or ():
            untagged(segments)
        return defer.succeed(b"OK")


class Events(list):
    def __call__(self, event):
        self.append(event)

    def texts(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self]


def _selection(account, positions=None, dry_run=False, commands=None, limit=1000):
    events = Events()
    s = Selection(account, "INBOX", commands or Commands(), positions, dry_run, limit,
                  log=Logger(observer=events))
    return s, events


def _status(uidnext, uidvalidity=7, unseen=0):
    return {b"UIDNEXT": uidnext, b"UIDVALIDITY": uidvalidity, b"UNSEEN": unseen}


class SelectionTests(SynchronousTestCase):
    def test_defaults_keep_unseen_search_and_touch_no_store(self):
        positions = MemoryPositions()
        s, _ = _selection(_account(), positions)
        self.successResultOf(defer.ensureDeferred(s.load()))
        self.assertFalse(s.tracked)
        self.assertEqual(s.query(b" UNKEYWORD $X"), b"SEARCH UNSEEN UNKEYWORD $X")
        self.assertTrue(self.successResultOf(defer.ensureDeferred(
            s.settled_by_status({b"UNSEEN": 0}))))
        self.successResultOf(defer.ensureDeferred(s.finish([5, 6])))
        self.assertEqual(positions.writes, [])

    def test_start_from_now_first_status_records_uidnext_minus_one_and_ends(self):
        positions = MemoryPositions()
        s, events = _selection(_account(start_from="now"), positions)
        self.successResultOf(defer.ensureDeferred(s.load()))
        done = self.successResultOf(defer.ensureDeferred(
            s.settled_by_status(_status(3001, unseen=3000))))
        self.assertTrue(done)
        self.assertEqual(positions.records, {("a1", "INBOX"): ("7", 3000)})
        self.assertIn("starting after UID 3000", " ".join(events.texts()))

    def test_start_from_now_without_uidnext_asks_the_highest_uid(self):
        commands = Commands({b"UID": [[b"SEARCH 41"]]})
        s, _ = _selection(_account(start_from="now"), MemoryPositions(), commands=commands)
        info = SelectInfo()
        info.uidvalidity = 7
        uidnext = self.successResultOf(defer.ensureDeferred(s.uidnext_of(info)))
        self.assertEqual((uidnext, commands.sent), (42, [(b"UID", b"SEARCH UID *")]))

    def test_a_recorded_position_searches_a_bounded_range_above_it(self):
        positions = MemoryPositions()
        positions.records[("a1", "INBOX")] = ("7", 100)
        for select, tail in (("new", b""), ("unseen", b" UNSEEN")):
            s, _ = _selection(_account(select=select, start_from="now"), positions, limit=500)
            self.successResultOf(defer.ensureDeferred(s.load()))
            self.assertTrue(self.successResultOf(defer.ensureDeferred(s.begin(7, 150))))
            self.assertEqual(s.query(), b"SEARCH UID 101:600" + tail)

    def test_uids_at_or_below_the_position_are_never_taken(self):
        # "UID 101:*" matches the highest UID even when it is 100
        positions = MemoryPositions()
        positions.records[("a1", "INBOX")] = ("7", 100)
        s, _ = _selection(_account(select="new"), positions)
        self.successResultOf(defer.ensureDeferred(s.load()))
        self.successResultOf(defer.ensureDeferred(s.begin(7, 101)))
        self.assertEqual(s.keep({100, 99, 103, 101}), [101, 103])

    def test_nothing_above_the_position_ends_at_status(self):
        positions = MemoryPositions()
        positions.records[("a1", "INBOX")] = ("7", 100)
        s, _ = _selection(_account(select="new"), positions)
        self.successResultOf(defer.ensureDeferred(s.load()))
        self.assertTrue(self.successResultOf(defer.ensureDeferred(
            s.settled_by_status(_status(101, unseen=5)))))
        s2, _ = _selection(_account(select="new"), positions)
        self.successResultOf(defer.ensureDeferred(s2.load()))
        self.assertFalse(self.successResultOf(defer.ensureDeferred(
            s2.settled_by_status(_status(102, unseen=0)))))

    def test_finish_moves_to_the_highest_found_or_the_searched_end(self):
        positions = MemoryPositions()
        s, _ = _selection(_account(select="new"), positions, limit=1000)
        self.successResultOf(defer.ensureDeferred(s.load()))
        self.successResultOf(defer.ensureDeferred(s.begin(7, 5001)))
        s.query()
        self.successResultOf(defer.ensureDeferred(s.finish([3, 9])))
        # every UID up to 1000 was searched and exists: the position moves there
        self.assertEqual(positions.records[("a1", "INBOX")], ("7", 1000))
        s2, _ = _selection(_account(select="new"), positions, limit=1000)
        self.successResultOf(defer.ensureDeferred(s2.load()))
        self.successResultOf(defer.ensureDeferred(s2.begin(7, 1200)))
        self.assertEqual(s2.query(), b"SEARCH UID 1001:2000")
        self.successResultOf(defer.ensureDeferred(s2.finish([])))
        # not past UIDNEXT - 1: mail arriving later gets higher UIDs
        self.assertEqual(positions.records[("a1", "INBOX")], ("7", 1199))

    def test_a_dry_run_reads_the_position_and_never_writes_it(self):
        positions = MemoryPositions()
        s, _ = _selection(_account(select="new", start_from="now"), positions, dry_run=True)
        self.successResultOf(defer.ensureDeferred(s.load()))
        self.assertFalse(self.successResultOf(defer.ensureDeferred(s.begin(7, 50))))
        self.successResultOf(defer.ensureDeferred(s.finish([60])))
        self.assertEqual((positions.writes, positions.records), ([], {}))

    def test_without_a_store_only_a_dry_run_may_poll(self):
        s, _ = _selection(_account(select="new"), None)
        f = self.failureResultOf(defer.ensureDeferred(s.load()), errors.FidoError)
        self.assertEqual(f.value.kind, errors.CONFIG)
        s, _ = _selection(_account(select="new"), None, dry_run=True)
        self.successResultOf(defer.ensureDeferred(s.load()))

    def test_redis_down_fails_the_poll_before_anything_is_fetched(self):
        positions = MemoryPositions()
        positions.fail = True
        s, _ = _selection(_account(select="new"), positions)
        f = self.failureResultOf(defer.ensureDeferred(s.load()), errors.FidoError)
        self.assertEqual(f.value.kind, errors.REDIS)

    def test_new_uidvalidity_with_start_from_now_starts_again_from_now_with_one_warning(self):
        positions = MemoryPositions()
        positions.records[("a1", "INBOX")] = ("7", 100)
        s, events = _selection(_account(start_from="now"), positions)
        self.successResultOf(defer.ensureDeferred(s.load()))
        self.assertFalse(self.successResultOf(defer.ensureDeferred(s.begin(8, 3001))))
        self.assertEqual(positions.records[("a1", "INBOX")], ("8", 3000))
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("UIDVALIDITY changed from 7 to 8", events.texts()[0])
        # the next poll finds its record: no warning again
        s2, events2 = _selection(_account(start_from="now"), positions)
        self.successResultOf(defer.ensureDeferred(s2.load()))
        self.assertTrue(self.successResultOf(defer.ensureDeferred(s2.begin(8, 3002))))
        self.assertEqual((s2.last, list(events2)), (3000, []))

    def test_new_uidvalidity_with_start_from_all_takes_the_mailbox_from_uid_one(self):
        positions = MemoryPositions()
        positions.records[("a1", "INBOX")] = ("7", 100)
        s, _ = _selection(_account(select="new"), positions)
        self.successResultOf(defer.ensureDeferred(s.load()))
        self.assertTrue(self.successResultOf(defer.ensureDeferred(s.begin(8, 20))))
        self.assertEqual(s.query(), b"SEARCH UID 1:1000")

    def test_status_refused_leaves_the_decision_to_select(self):
        commands = Commands({b"STATUS": ImapCommandError(b"STATUS", b"NO", b"no")})
        s, _ = _selection(_account(select="new"), MemoryPositions(), commands=commands)
        self.assertIsNone(self.successResultOf(defer.ensureDeferred(s.status())))
        self.assertEqual(commands.sent, [(b"STATUS", b'"INBOX" (UIDNEXT UIDVALIDITY UNSEEN)')])

    @given(last=st.integers(0, MAX_UID - 1), limit=st.integers(1, 1_000_000),
           found=st.lists(st.integers(1, MAX_UID), max_size=20),
           uidnext=st.one_of(st.none(), st.integers(1, MAX_UID + 1)))
    @hsettings(max_examples=200, deadline=None)
    def test_the_position_never_passes_an_unsearched_or_unborn_uid(self, last, limit, found,
                                                                    uidnext):
        positions = MemoryPositions()
        positions.records[("a1", "INBOX")] = ("7", last)
        s, _ = _selection(_account(select="new"), positions, limit=limit)
        self.successResultOf(defer.ensureDeferred(s.load()))
        self.successResultOf(defer.ensureDeferred(s.begin(7, uidnext)))
        query = s.query()
        low, high = (int(x) for x in query.split()[2].split(b":"))
        self.assertEqual(low, last + 1)
        self.assertLessEqual(high - low + 1, limit)
        kept = [u for u in s.keep(found) if u <= high]
        self.successResultOf(defer.ensureDeferred(s.finish(kept)))
        new = positions.records[("a1", "INBOX")][1]
        # only ever up to what was searched, found, and existed
        bound = max([last] + kept + ([min(high, uidnext - 1)] if uidnext else []))
        self.assertEqual(new, bound)
        self.assertGreaterEqual(new, last)


# -- whole polls against the mock IMAP server (loopback) ---------------------------

SETTINGS = ImapSettings(connect_timeout=2.0, greeting_timeout=2.0, command_timeout=2.0,
                        logout_timeout=1.0)


@pytest.fixture
def server():
    s = MockIMAPServer(reactor, {})
    yield s
    pytest_twisted.blockon(s.stop())


def _mock_account(server, user, messages, **kw):
    server.accounts[user] = MockMailbox(PASSWORD, messages, uidvalidity=100)
    port = server.listen(account=user)
    return Account(id="acct-" + user, host="127.0.0.1", port=port, username=user,
                   password=PASSWORD, security="none", **kw)


def _poll(account, sink, positions, **kw):
    return fetch_mailbox(reactor, account, sink, SETTINGS, positions=positions, **kw)


def _names(server, user):
    return [c.name for c in server.commands(user)]


def _delivered(sink):
    return [int(m.id) for m in sink.entries]


@pytest_twisted.inlineCallbacks
def test_select_new_delivers_a_message_a_person_already_read_once(server):
    old = [(sample_message(i, "r"), ("\\Seen",)) for i in (1, 2)] + [sample_message(3, "r")]
    acct = _mock_account(server, "r", old, select="new")
    sink, positions = MemorySink(), MemoryPositions()
    result = yield _poll(acct, sink, positions)
    assert result.ok and result.fetched == 3, result
    assert _delivered(sink) == [1, 2, 3]
    assert positions.records[("acct-r", "INBOX")] == ("100", 3)
    # a person reads a new message before Fido's next poll: it is delivered anyway
    server.mailbox("r").append(sample_message(4, "r"), ("\\Seen",))
    result = yield _poll(acct, sink, positions)
    assert result.ok and result.fetched == 1 and _delivered(sink) == [1, 2, 3, 4], result
    assert [c.args[0] for c in server.commands("r", "UID SEARCH")][-1] == b"UID"
    # nothing new: STATUS says so, the mailbox is not even opened
    before = len(server.commands("r"))
    result = yield _poll(acct, sink, positions)
    assert result.ok and result.fetched == 0 and result.marked == 0
    assert "SELECT" not in _names(server, "r")[before:]
    assert _delivered(sink) == [1, 2, 3, 4]


@pytest_twisted.inlineCallbacks
def test_start_from_now_leaves_old_mail_and_takes_each_later_message_once(server):
    old = [sample_message(i, "n") for i in range(1, 6)]
    for select in ("unseen", "new"):
        user = f"n-{select}"
        acct = _mock_account(server, user, old, select=select, start_from="now")
        sink, positions = MemorySink(), MemoryPositions()
        result = yield _poll(acct, sink, positions)
        assert result.ok and result.fetched == 0 and result.marked == 0, result
        assert "SELECT" not in _names(server, user)  # STATUS was enough
        assert positions.records[("acct-" + user, "INBOX")] == ("100", 5)
        server.mailbox(user).append(sample_message(6, user))
        server.mailbox(user).append(sample_message(7, user), ("\\Seen",))
        result = yield _poll(acct, sink, positions)
        result2 = yield _poll(acct, sink, positions)
        assert result.ok and result2.ok and result2.fetched == 0, (result, result2)
        want = [6] if select == "unseen" else [6, 7]
        assert _delivered(sink) == want, select
        box = server.mailbox(user)
        assert all(box.flags(u) == set() for u in range(1, 6))  # old mail untouched
        assert box.flags(6) == {"\\Seen"}


@pytest_twisted.inlineCallbacks
def test_a_failed_delivery_leaves_the_position_and_the_next_poll_delivers(server):
    acct = _mock_account(server, "f", [sample_message(1, "f")], select="new")
    sink, positions = MemorySink(), MemoryPositions()
    yield _poll(acct, sink, positions)
    server.mailbox("f").append(sample_message(2, "f"))
    sink.fail = errors.FidoError(errors.REDIS, "Redis is not connected")
    result = yield _poll(acct, sink, positions)
    assert result.kind == errors.REDIS, result
    assert positions.records[("acct-f", "INBOX")] == ("100", 1)
    assert server.mailbox("f").flags(2) == set()
    sink.fail = None
    result = yield _poll(acct, sink, positions)
    assert result.ok and _delivered(sink) == [1, 2], result
    assert positions.records[("acct-f", "INBOX")] == ("100", 2)


class _AdvanceFails(MemoryPositions):
    """Reads work; the write after marking fails (Redis lost at that moment)."""

    broken = True

    def advance(self, *args):
        if self.broken:
            return defer.fail(errors.FidoError(errors.REDIS, "Redis is not connected"))
        return super().advance(*args)


@pytest_twisted.inlineCallbacks
def test_a_position_lost_after_marking_repeats_marking_never_a_delivery(server):
    acct = _mock_account(server, "c", [sample_message(1, "c"), sample_message(2, "c")],
                         select="new", after_fetch="seen")
    sink, positions = MemorySink(), _AdvanceFails()
    result = yield _poll(acct, sink, positions)
    assert result.kind == errors.REDIS and result.fetched == 2, result
    assert positions.records == {}
    positions.broken = False
    result = yield _poll(acct, sink, positions)
    assert result.ok and result.fetched == 0 and result.marked == 2, result
    assert _delivered(sink) == [1, 2]
    assert positions.records[("acct-c", "INBOX")] == ("100", 2)


@pytest_twisted.inlineCallbacks
def test_a_dry_run_writes_no_position_and_says_what_it_would_take(server):
    acct = _mock_account(server, "d", [sample_message(1, "d"), (sample_message(2, "d"),
                                                                 ("\\Seen",))], select="new")
    positions = MemoryPositions()
    result = yield _poll(acct, MemorySink(), positions, dry_run=True)
    assert result.ok and result.fetched == 2 and result.dry_run, result
    assert positions.writes == [] and "EXAMINE" in _names(server, "d")
    now = attr.evolve(acct, start_from="now")
    result = yield _poll(now, MemorySink(), None, dry_run=True)
    assert result.ok and result.fetched == 0 and positions.writes == []


@pytest_twisted.inlineCallbacks
def test_without_status_select_decides_and_records_the_start(server):
    acct = _mock_account(server, "s", [sample_message(1, "s")], start_from="now")
    server.script("s", Behaviour(faults=(Fault("STATUS", "bad", b"no STATUS here"),)))
    positions = MemoryPositions()
    result = yield _poll(acct, MemorySink(), positions)
    assert result.ok and result.fetched == 0, result
    assert "SELECT" in _names(server, "s")
    assert positions.records[("acct-s", "INBOX")] == ("100", 1)


@pytest_twisted.inlineCallbacks
def test_a_new_uidvalidity_with_start_from_now_takes_nothing_old(server):
    acct = _mock_account(server, "v", [sample_message(1, "v")], start_from="now",
                         select="new")
    sink, positions = MemorySink(), MemoryPositions()
    yield _poll(acct, sink, positions)
    folder = server.mailbox("v").folders["INBOX"]
    folder.append(sample_message(2, "v"))
    folder.renumber()  # a restored mailbox: new UIDVALIDITY, UIDs 1..2
    result = yield _poll(acct, sink, positions)
    assert result.ok and result.fetched == 0, result
    assert positions.records[("acct-v", "INBOX")] == ("101", 2)
    folder.append(sample_message(3, "v"))
    result = yield _poll(acct, sink, positions)
    assert result.ok and _delivered(sink) == [3], result


# -- the record in a real Redis ------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_the_redis_position_only_rises_within_a_uidvalidity_and_a_new_one_replaces_it(redis):
    from fido_tx.redis import keys
    from fido_tx.redis.positions import MailboxPositions
    from tests.support.redisconn import close, shared_connection

    conn = yield shared_connection(reactor, redis.port)
    try:
        positions = MailboxPositions(conn)
        assert (yield positions.get("a1", "INBOX")) is None
        yield positions.advance("a1", "INBOX", "7", 10)
        yield positions.advance("a1", "INBOX", "7", 4)  # a late, lower write
        assert (yield positions.get("a1", "INBOX")) == ("7", 10)
        yield positions.advance("a1", "INBOX", "8", 3)
        assert (yield positions.get("a1", "INBOX")) == ("8", 3)
        assert (yield positions.get("a1", "Archive")) is None
        raw = redis.client()("HGETALL", keys.imap_position("a1", "INBOX"))
        assert raw == [b"8", b"3"]
        assert keys.imap_position("a1", "INBOX") == b"fido:imap:position:{a1}:INBOX"
    finally:
        yield close(conn)


# -- held connections: EXISTS wakes the same poll ------------------------------------


@pytest_twisted.inlineCallbacks
def test_a_held_idle_connection_starts_from_now_and_takes_read_mail_with_select_new(server):
    import random

    from twisted.internet import task

    from fido_tx.config import BackoffSettings
    from fido_tx.sources import SourceContext
    from fido_tx.sources.imap import held
    from fido_tx.sources.imap.holding import HeldImap
    from tests.support.mockimap import IDLE_CAPABILITIES

    acct = attr.evolve(_mock_account(server, "h", [sample_message(1, "h")]),
                       select="new", start_from="now")
    server.script("h", Behaviour(capabilities=IDLE_CAPABILITIES))
    sink, positions, results = MemorySink(), MemoryPositions(), []
    ctx = SourceContext(reactor=reactor, sink=sink, settings=SETTINGS, positions=positions)
    source = HeldImap(acct, ctx)
    machine = held.HeldAccount(
        acct.id, acct.host, source.open, source.poll, results.append, reactor,
        held.HeldSettings(idle_refresh=600.0, poll_interval=3600.0, command_timeout=1.0,
                          logout_timeout=0.5, min_hold=0.5,
                          reconnect=BackoffSettings(initial=0.1, maximum=0.5, jitter=0.0)),
        held.HeldPool(), random.Random(0))
    machine.start()

    @defer.inlineCallbacks
    def until(check, timeout=5.0):
        deadline = reactor.seconds() + timeout
        while not check():
            assert reactor.seconds() < deadline, "not true in time"
            yield task.deferLater(reactor, 0.02, lambda: None)

    try:
        yield until(lambda: machine.state == held.IDLING)
        assert positions.records[("acct-h", "INBOX")] == ("100", 1)
        assert _delivered(sink) == []
        server.deliver("h", sample_message(2, "h"), flags=("\\Seen",))
        yield until(lambda: _delivered(sink) == [2])
        yield until(lambda: positions.records[("acct-h", "INBOX")] == ("100", 2))
        assert server.commands("h", "STATUS") == []  # none on the selected mailbox
        assert server.mailbox("h").flags(1) == set()
        assert all(r.ok for r in results), results
    finally:
        yield machine.stop(timeout=2)
