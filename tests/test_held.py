"""Held connections (fido_tx.sources.imap.held): the per-account state machine.

Synchronous: a Clock, FidoIMAP4Client on a StringTransport answered by a
small scripted server, and fake open/poll/report collaborators.
"""

import random

from twisted.internet import defer, task
from twisted.internet import error as ierror
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.config import BackoffSettings
from fido_tx.errors import FidoError
from fido_tx.outcome import SessionResult
from fido_tx.sources.imap import held
from fido_tx.sources.imap.client import FidoIMAP4Client


class FakeServer(StringTransport):
    """The server end of one connection: answers IDLE, DONE, NOOP, LOGOUT
    one reactor turn after the client writes.

    ``idle``: offer IDLE (else IDLE gets BAD); ``silent``: answer nothing
    from now on; ``seen``: every command line received.
    """

    def __init__(self, clock, idle=True):
        super().__init__()
        self.clock = clock
        self.idle = idle
        self.silent = False
        #: untagged lines sent before NOOP's OK (mail the server found)
        self.noop_untagged = []
        self.seen = []
        self.client = None
        self._idle_tag = None

    def write(self, data):
        super().write(data)
        self.clock.callLater(0, self._answer)

    def _answer(self):
        data = self.value()
        self.clear()
        for line in data.split(b"\r\n")[:-1]:
            self.seen.append(line)
            if self.silent or self.client.closed:
                continue
            if line == b"DONE":
                tag, self._idle_tag = self._idle_tag, None
                self.send(tag + b" OK Idle completed")
                continue
            tag, _, command = line.partition(b" ")
            if command == b"IDLE":
                if self.idle:
                    self._idle_tag = tag
                    self.send(b"+ idling")
                else:
                    self.send(tag + b" BAD Unknown command")
            elif command == b"NOOP":
                self.send(*self.noop_untagged, tag + b" OK NOOP completed")
            elif command == b"LOGOUT":
                self.send(b"* BYE bye", tag + b" OK LOGOUT completed")
                self.drop()

    def send(self, *lines):
        self.client.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def drop(self):
        if not self.client.closed:
            self.client.connectionLost(failure.Failure(ierror.ConnectionDone()))

    def abortConnection(self):
        super().abortConnection()
        self.clock.callLater(0, self.drop)

    def commands(self):
        return [line.partition(b" ")[2] if line != b"DONE" else line for line in self.seen]


class Harness:
    """One HeldAccount with fake collaborators."""

    def __init__(self, test, idle_caps=True, pool=None, host="imap.test", account_id="a1",
                 clock=None, **settings):
        self.test = test
        self.clock = clock or task.Clock()
        self.servers = []
        self.polls = []
        self.reports = []
        self.fresh = []
        self.open_errors = []
        self.poll_results = []
        self.idle_caps = idle_caps
        self.server_idle = idle_caps
        self.pool = pool or held.HeldPool()
        defaults = dict(reconnect=BackoffSettings(initial=1.0, maximum=300.0, jitter=0.0,
                                                  auth_initial=600.0, auth_maximum=3600.0),
                        idle_refresh=600.0, poll_interval=3600.0, command_timeout=5.0,
                        logout_timeout=2.0)
        defaults.update(settings)
        self.settings = held.HeldSettings(**defaults)
        self.ready = None
        self.machine = held.HeldAccount(
            account_id, host, self.open, self.poll, self.reports.append, self.clock,
            self.settings, self.pool, random.Random(1), poll_fresh=self.poll_fresh,
            ready=lambda: self.ready if self.ready is not None else defer.succeed(None))

    def open(self):
        if self.open_errors:
            return defer.fail(self.open_errors.pop(0))
        client = FidoIMAP4Client(self.clock, greeting_timeout=10, command_timeout=5)
        server = FakeServer(self.clock, idle=self.server_idle)
        server.client = client
        client.makeConnection(server)
        client.dataReceived(b"* OK hi\r\n")
        self.servers.append(server)
        caps = frozenset([b"IMAP4REV1", b"IDLE"] if self.idle_caps else [b"IMAP4REV1"])
        return defer.succeed(held.HeldConnection(client, caps, exists=0))

    def poll(self, conn):
        self.polls.append((self.clock.seconds(), conn))
        if self.poll_results:
            return self.poll_results.pop(0)
        return defer.succeed(SessionResult(account_id="a1"))

    def poll_fresh(self):
        self.fresh.append(self.clock.seconds())
        return defer.succeed(SessionResult(account_id="a1", fetched=1))

    @property
    def server(self):
        return self.servers[-1]

    def turn(self, seconds=0.0):
        self.clock.advance(seconds)
        for _ in range(10):  # let the zero-delay answers run
            self.clock.advance(0)


class HoldTests(SynchronousTestCase):
    def test_connect_catch_up_then_idle_and_wake_on_exists(self):
        h = Harness(self)
        h.machine.start()
        h.turn()
        self.assertEqual(h.machine.state, held.IDLING)
        self.assertEqual(len(h.polls), 1)  # the catch-up poll
        self.assertEqual(h.pool.snapshot(), {"held": 1, "idling": 1, "reconnects": 0,
                                             "fallback": 0})
        h.turn(30)
        h.server.send(b"* 1 EXISTS")
        h.turn()
        self.assertEqual(len(h.polls), 2)
        self.assertEqual(h.polls[1][0], 30.0)  # at once
        self.assertEqual(h.server.commands(), [b"IDLE", b"DONE", b"IDLE"])
        self.assertEqual(h.machine.state, held.IDLING)
        self.assertEqual(h.machine.history,
                         [held.CONNECTING, held.FETCHING, held.IDLING, held.FETCHING,
                          held.IDLING])
        self.assertEqual(len(h.servers), 1)  # one connection for all of it
        self.assertEqual(h.reports, [SessionResult(account_id="a1")] * 2)

    def test_refresh_probes_with_noop_and_idles_again(self):
        h = Harness(self, idle_refresh=600, poll_interval=3600)
        h.machine.start()
        h.turn()
        h.turn(600)
        self.assertEqual(h.server.commands(), [b"IDLE", b"DONE", b"NOOP", b"IDLE"])
        self.assertEqual(len(h.polls), 1)  # a refresh is no poll
        h.turn(600)
        self.assertEqual(h.server.commands()[-3:], [b"DONE", b"NOOP", b"IDLE"])

    def test_poll_interval_is_the_longest_without_a_check(self):
        h = Harness(self, idle_refresh=600, poll_interval=60)
        h.machine.start()
        h.turn()
        h.turn(60)
        self.assertEqual([t for t, _ in h.polls], [0.0, 60.0])
        # a check nothing announced: NOOP first (servers look for new mail then)
        self.assertEqual(h.server.commands(), [b"IDLE", b"DONE", b"NOOP", b"IDLE"])

    def test_without_idle_polls_the_held_connection(self):
        h = Harness(self, idle_caps=False, poll_interval=60)
        h.machine.start()
        h.turn()
        self.assertEqual(h.machine.state, held.WAITING)
        for _ in range(3):
            h.turn(60)
        self.assertEqual([t for t, _ in h.polls], [0.0, 60.0, 120.0, 180.0])
        self.assertEqual(len(h.servers), 1)
        self.assertEqual({id(c) for _, c in h.polls}, {id(h.polls[0][1])})
        # each check: a NOOP (the server looks for new mail), then the poll
        self.assertEqual(h.server.commands(), [b"NOOP"] * 3)

    def test_idle_false_polls_even_when_the_server_offers_idle(self):
        h = Harness(self, idle=False, poll_interval=60)
        h.machine.start()
        h.turn(60)
        self.assertEqual(len(h.polls), 2)
        self.assertNotIn(b"IDLE", h.server.commands())

    def test_a_quiet_check_is_a_noop_alone_while_the_last_search_is_recent(self):
        h = Harness(self, idle=False, poll_interval=60, full_search=600)
        h.machine.start()
        h.turn()
        self.assertEqual(len(h.polls), 1)  # the catch-up search after SELECT
        h.turn(60)
        h.turn(60)
        # two checks: a NOOP each, nothing announced, no search, no slot
        self.assertEqual(h.server.commands(), [b"NOOP", b"NOOP"])
        self.assertEqual(len(h.polls), 1)
        self.assertEqual(len(h.reports), 3)  # each check still reported
        self.assertTrue(all(r.ok and r.fetched == 0 for r in h.reports))
        self.assertEqual(h.machine.last_check, 120.0)

    def test_a_noop_announcing_mail_makes_the_search(self):
        h = Harness(self, idle=False, poll_interval=60, full_search=600)
        h.machine.start()
        h.turn()
        h.server.noop_untagged = [b"* 1 EXISTS"]
        h.turn(60)
        self.assertEqual(len(h.polls), 2)
        self.assertEqual(h.polls[1][0], 60.0)
        self.assertEqual(h.server.commands(), [b"NOOP"])  # one NOOP, then the poll

    def test_an_expunge_and_an_arrival_in_one_noop_make_the_search(self):
        h = Harness(self, idle=False, poll_interval=60, full_search=600)
        h.machine.start()
        h.turn()
        h.machine.conn.exists = 3
        h.server.noop_untagged = [b"* 2 EXPUNGE", b"* 3 EXISTS"]  # the count unchanged
        h.turn(60)
        self.assertEqual(len(h.polls), 2)

    def test_after_a_failed_or_fetching_poll_the_next_check_searches(self):
        # a failed delivery (Redis down) or mail beyond max_search_uids leaves
        # work behind that no NOOP will announce again
        h = Harness(self, idle=False, poll_interval=60, full_search=600)
        h.poll_results = [defer.succeed(SessionResult(account_id="a1", kind="redis")),
                          defer.succeed(SessionResult(account_id="a1", fetched=5))]
        h.machine.start()
        h.turn()
        h.turn(60)  # after the failure: searches (and fetches 5)
        h.turn(60)  # after fetching: searches again, finds nothing
        h.turn(60)  # quiet
        self.assertEqual([t for t, _ in h.polls], [0.0, 60.0, 120.0])

    def test_a_full_search_still_comes_every_full_search_seconds(self):
        h = Harness(self, idle=False, poll_interval=60, full_search=300)
        h.machine.start()
        h.turn()
        for _ in range(5):
            h.turn(60)
        self.assertEqual([t for t, _ in h.polls], [0.0, 300.0])  # nothing announced

    def test_server_refusing_idle_falls_back_to_polling_on_the_connection(self):
        h = Harness(self, poll_interval=60)
        h.server_idle = False  # advertises IDLE, answers BAD
        h.machine.start()
        h.turn()
        self.assertEqual(h.machine.state, held.WAITING)
        h.turn(60)
        self.assertEqual(len(h.polls), 2)
        self.assertEqual(h.server.commands(), [b"IDLE", b"NOOP"])
        self.assertEqual(h.reports, [SessionResult(account_id="a1")] * 2)

    def test_unsolicited_exists_wakes_a_waiting_connection(self):
        h = Harness(self, idle_caps=False, poll_interval=60)
        h.machine.start()
        h.turn(10)
        h.server.send(b"* 5 EXISTS")
        h.turn()
        self.assertEqual([t for t, _ in h.polls], [0.0, 10.0])

    def test_a_poll_after_an_announcement_sends_no_noop(self):
        h = Harness(self)
        h.machine.start()
        h.turn(30)
        h.server.send(b"* 1 EXISTS")  # the server has told: no need to ask
        h.turn()
        self.assertEqual(len(h.polls), 2)
        self.assertEqual(h.server.commands(), [b"IDLE", b"DONE", b"IDLE"])

    def test_noop_announcing_mail_before_a_check_makes_one_poll(self):
        h = Harness(self, idle_caps=False, poll_interval=60)
        h.machine.start()
        h.turn()
        h.server.noop_untagged = [b"* 3 EXISTS", b"* 1 RECENT"]
        h.turn(60)  # the check's NOOP finds a message: one poll, not two
        self.assertEqual(h.server.commands(), [b"NOOP"])
        self.assertEqual(len(h.polls), 2)
        self.assertEqual(h.polls[1][1].exists, 3)
        self.assertEqual(h.machine.state, held.WAITING)

    def test_exists_during_a_poll_makes_another_poll(self):
        h = Harness(self)
        slow = defer.Deferred()
        h.poll_results = [defer.succeed(SessionResult(account_id="a1")), slow]
        h.machine.start()
        h.turn()
        h.server.send(b"* 1 EXISTS")
        h.turn()
        self.assertEqual(len(h.polls), 2)
        h.server.send(b"* 2 EXISTS")  # arrives while the second poll runs
        slow.callback(SessionResult(account_id="a1"))
        h.turn()
        self.assertEqual(len(h.polls), 3)
        self.assertEqual(h.machine.state, held.IDLING)


class LossTests(SynchronousTestCase):
    def test_lost_after_a_long_hold_reconnects_at_once_without_report(self):
        h = Harness(self)
        h.machine.start()
        h.turn(300)
        h.server.send(b"* BYE Disconnected for inactivity")
        h.server.drop()
        h.turn()
        self.assertEqual(len(h.servers), 2)
        self.assertEqual(h.machine.state, held.IDLING)
        self.assertEqual(h.pool.reconnects, 1)
        self.assertEqual(h.machine.reconnects, 1)
        self.assertTrue(all(r.ok for r in h.reports))
        self.assertEqual(h.pool.held, 1)

    def test_server_dropping_idle_connections_every_few_seconds_is_never_reported(self):
        h = Harness(self)
        h.machine.start()
        h.turn()
        for _ in range(10):
            h.turn(5)
            h.server.drop()
            h.turn(1)  # an early loss waits its 1 s backoff
            h.turn(1)
        self.assertGreaterEqual(len(h.servers), 10)
        self.assertTrue(all(r.ok for r in h.reports))

    def test_silent_mid_idle_found_at_refresh_and_replaced(self):
        h = Harness(self, idle_refresh=600)
        h.machine.start()
        h.turn(100)
        h.server.silent = True
        h.turn(600)  # refresh: DONE unanswered
        self.assertEqual(len(h.servers), 1)
        h.turn(5.1)  # DONE's deadline: aborted
        h.turn()
        self.assertEqual(len(h.servers), 2)
        self.assertEqual(h.machine.state, held.IDLING)
        self.assertTrue(all(r.ok for r in h.reports))

    def test_failing_connects_back_off_and_report_only_when_they_keep_failing(self):
        h = Harness(self)
        down = FidoError(errors.CONNECT, "connection refused")
        h.open_errors = [down] * 4
        h.machine.start()
        h.turn()
        self.assertEqual(h.machine.state, held.BACKOFF)
        times = []
        for _ in range(60):
            h.turn(0.5)
            if h.reports and not times:
                times.append(h.clock.seconds())
        self.assertEqual(h.machine.state, held.IDLING)
        errs = [r for r in h.reports if not r.ok]
        self.assertEqual([r.kind for r in errs], [errors.CONNECT, errors.CONNECT])
        # backoff 1, 2, 4 s: the third failure (at 3 s) is the first reported
        self.assertEqual(times, [3.0])
        self.assertTrue(h.reports[-1].ok)

    def test_auth_failure_is_reported_at_once_and_uses_the_auth_schedule(self):
        h = Harness(self)
        h.open_errors = [FidoError(errors.AUTH, "login failed: [AUTHENTICATIONFAILED]")]
        h.machine.start()
        h.turn()
        self.assertEqual([r.kind for r in h.reports], [errors.AUTH])
        h.turn(599)
        self.assertEqual(len(h.servers), 0)
        h.turn(1)
        self.assertEqual(len(h.servers), 1)

    def test_connection_lost_right_after_connect_counts_as_failure(self):
        h = Harness(self)
        h.machine.start()
        for _ in range(3):
            h.turn()
            h.server.drop()
            h.turn(0.1)
            h.turn(10)
        # every catch-up poll succeeded, so the streak never reaches a report
        self.assertTrue(all(r.ok for r in h.reports))

    def test_poll_failing_because_the_connection_died_is_not_reported(self):
        h = Harness(self)
        h.machine.start()
        h.turn()

        def dies(conn):
            h.server.drop()
            return defer.succeed(SessionResult(account_id="a1", kind=errors.PROTOCOL,
                                               message="server closed the connection"))

        h.machine.poll = dies
        h.server.send(b"* 1 EXISTS")
        h.turn()
        h.machine.poll = h.poll
        h.turn(1)
        self.assertEqual(len(h.servers), 2)
        self.assertTrue(all(r.ok for r in h.reports))

    def test_polls_that_keep_dying_are_reported_even_after_long_holds(self):
        h = Harness(self)

        def dies(conn):
            h.polls.append((h.clock.seconds(), conn))
            h.clock.callLater(0, h.server.drop)
            return task.deferLater(h.clock, 0.5, lambda: SessionResult(
                account_id="a1", kind=errors.TIMEOUT, message="no response to UID FETCH"))

        h.machine.poll = dies
        h.machine.start()
        polls_at_first_report = None
        for _ in range(40):
            h.turn(1)
            if h.reports and polls_at_first_report is None:
                polls_at_first_report = len(h.polls)
        self.assertEqual(polls_at_first_report, 3)  # the third failure in a row
        self.assertEqual({r.kind for r in h.reports}, {errors.TIMEOUT})
        self.assertEqual(h.machine.state, held.BACKOFF)

    def test_redis_failure_is_reported_and_the_connection_kept(self):
        h = Harness(self)
        h.poll_results = [defer.succeed(SessionResult(account_id="a1", kind=errors.REDIS,
                                                      message="redis down"))]
        h.machine.start()
        h.turn()
        self.assertEqual([r.kind for r in h.reports], [errors.REDIS])
        self.assertEqual(h.machine.state, held.IDLING)
        self.assertEqual(len(h.servers), 1)


class LimitTests(SynchronousTestCase):
    def test_too_many_connections_falls_back_to_fresh_connection_polling(self):
        h = Harness(self, poll_interval=60, fallback_retry=300)
        h.open_errors = [FidoError(errors.CONNECT, "server cannot log in now: [LIMIT] "
                                                   "Too many simultaneous connections")]
        h.machine.start()
        h.turn()
        self.assertEqual(h.machine.state, held.FALLBACK)
        self.assertEqual(h.pool.fallback, 1)
        self.assertEqual(h.pool.per_host("imap.test"), 0)
        h.turn(60)
        h.turn(60)
        self.assertEqual(h.fresh, [0.0, 60.0, 120.0])
        self.assertEqual(h.reports, [SessionResult(account_id="a1", fetched=1)] * 3)
        h.turn(180)  # fallback_retry over: hold again
        self.assertEqual(h.machine.state, held.IDLING)
        self.assertEqual(h.pool.fallback, 0)

    def test_max_connections_per_host_bounds_held_connections(self):
        pool = held.HeldPool(max_per_host=2)
        clock = task.Clock()
        hs = [Harness(self, pool=pool, clock=clock, account_id=f"a{i}") for i in range(3)]
        other = Harness(self, pool=pool, clock=clock, host="other.test")
        for h in hs + [other]:
            h.machine.start()
        hs[0].turn()
        self.assertEqual([h.machine.state for h in hs],
                         [held.IDLING, held.IDLING, held.FALLBACK])
        self.assertEqual(other.machine.state, held.IDLING)
        self.assertEqual(pool.held, 3)
        self.assertEqual(pool.per_host("imap.test"), 2)

    def test_too_many_connections_text(self):
        self.assertTrue(held.too_many_connections(
            FidoError(errors.CONNECT, "server cannot log in now: [LIMIT] over")))
        self.assertTrue(held.too_many_connections(
            FidoError(errors.CONNECT, "server refused the session: BYE Too many connections")))
        self.assertFalse(held.too_many_connections(FidoError(errors.CONNECT, "refused")))


class StopTests(SynchronousTestCase):
    def test_stop_while_idling_sends_done_then_logout(self):
        h = Harness(self)
        h.machine.start()
        h.turn(30)
        d = h.machine.stop(timeout=20)
        h.turn()
        self.successResultOf(d)
        self.assertEqual(h.server.commands(), [b"IDLE", b"DONE", b"LOGOUT"])
        self.assertEqual(h.machine.state, held.CLOSED)
        self.assertEqual(h.machine.history[-2:], [held.CLOSING, held.CLOSED])
        self.assertEqual(h.pool.snapshot(), {"held": 0, "idling": 0, "reconnects": 0,
                                             "fallback": 0})
        self.assertEqual(h.pool.per_host("imap.test"), 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_on_close_called_once_closed(self):
        h = Harness(self)
        closed = []
        opener = h.open

        def open_():
            d = opener()
            d.addCallback(lambda conn: (setattr(conn, "on_close", lambda: closed.append(
                conn.client.closed or conn.client.transport.disconnecting)), conn)[1])
            return d

        h.machine.open = open_
        h.machine.start()
        h.turn()
        h.server.drop()
        h.turn()
        self.assertEqual(closed, [True])  # the lost one
        h.turn(1)  # reconnected after its backoff
        self.assertEqual(len(h.servers), 2)
        d = h.machine.stop()
        h.turn()
        self.successResultOf(d)
        self.assertEqual(closed, [True, True])  # and the one stopped

    def test_stop_waits_for_the_running_poll(self):
        h = Harness(self)
        slow = defer.Deferred()
        h.poll_results = [slow]
        h.machine.start()
        h.turn()
        d = h.machine.stop(timeout=20)
        h.turn(5)
        self.assertNoResult(d)
        slow.callback(SessionResult(account_id="a1", fetched=2))
        h.turn()
        self.successResultOf(d)
        self.assertEqual(h.reports[-1].fetched, 2)
        self.assertEqual(h.server.commands(), [b"LOGOUT"])

    def test_stop_timeout_cancels_the_poll_and_aborts(self):
        h = Harness(self)
        h.poll_results = [defer.Deferred()]
        h.machine.start()
        h.turn()
        d = h.machine.stop(timeout=20)
        h.turn(20)
        h.turn()
        self.successResultOf(d)
        self.assertTrue(h.server.client.closed)
        self.assertEqual(h.machine.state, held.CLOSED)

    def test_stop_during_backoff_and_silent_logout(self):
        h = Harness(self)
        h.open_errors = [FidoError(errors.CONNECT, "refused")]
        h.machine.start()
        h.turn()
        self.successResultOf(h.machine.stop())
        self.assertEqual(h.machine.state, held.CLOSED)
        h2 = Harness(self)
        h2.machine.start()
        h2.turn()
        h2.server.silent = True
        d = h2.machine.stop()
        h2.turn(5.1)  # DONE unanswered: aborted, LOGOUT not waited for
        h2.turn()
        self.successResultOf(d)

    def test_stop_during_fallback(self):
        h = Harness(self, poll_interval=60)
        h.open_errors = [FidoError(errors.CONNECT, "[LIMIT] Too many connections")]
        h.machine.start()
        h.turn(30)
        self.successResultOf(h.machine.stop())
        self.assertEqual(h.pool.fallback, 0)


class SlotTests(SynchronousTestCase):
    def test_every_poll_takes_the_slot_ready_gives_and_releases_it(self):
        h = Harness(self, poll_interval=60, fallback_retry=120)
        events = []

        def ready():
            events.append("take")
            return defer.succeed(lambda: events.append("release"))

        h.machine.ready = ready
        h.machine.poll = lambda conn: (events.append("poll"),
                                       defer.succeed(SessionResult(account_id="a1")))[1]
        h.machine.start()
        h.turn()
        h.server.send(b"* 1 EXISTS")
        h.turn()
        self.assertEqual(events, ["take", "poll", "release"] * 2)
        h.server.drop()
        h.open_errors = [FidoError(errors.CONNECT, "[LIMIT] Too many connections")]
        h.machine.poll_fresh = lambda: (events.append("fresh"),
                                        defer.succeed(SessionResult(account_id="a1")))[1]
        del events[:]
        h.turn(1)
        self.assertEqual(events[:3], ["take", "fresh", "release"])

    def test_release_even_when_the_poll_dies(self):
        h = Harness(self)
        released = []
        h.machine.ready = lambda: defer.succeed(lambda: released.append(1))
        h.poll_results = [defer.fail(ZeroDivisionError())]
        h.machine.start()
        h.turn()
        self.assertEqual(released, [1])
        self.flushLoggedErrors(ZeroDivisionError)


class BackpressureTests(SynchronousTestCase):
    def test_woken_while_paused_waits_then_fetches(self):
        h = Harness(self)
        h.machine.start()
        h.turn()
        h.ready = defer.Deferred()  # fetching paused (backlog, Redis down)
        h.server.send(b"* 1 EXISTS")
        h.turn(30)
        self.assertEqual(len(h.polls), 1)
        self.assertEqual(h.machine.state, held.FETCHING)
        self.assertFalse(h.server.client.closed)  # still held, logged in
        resumed, h.ready = h.ready, None
        resumed.callback(None)
        h.turn()
        self.assertEqual(len(h.polls), 2)
        self.assertEqual(h.machine.state, held.IDLING)

    def test_stop_while_paused(self):
        h = Harness(self)
        h.machine.start()
        h.turn()
        h.ready = defer.Deferred()
        h.server.send(b"* 1 EXISTS")
        h.turn()
        d = h.machine.stop()
        h.turn()
        self.successResultOf(d)
        self.assertEqual(h.server.commands()[-1], b"LOGOUT")


class TransitionTests(SynchronousTestCase):
    def test_every_state_can_reach_closed(self):
        for state in held.TRANSITIONS:
            seen, todo = set(), [state]
            while todo:
                s = todo.pop()
                if s in seen:
                    continue
                seen.add(s)
                todo.extend(held.TRANSITIONS[s])
            self.assertIn(held.CLOSED, seen, state)

    def test_settings_from_fido_settings(self):
        from fido_tx.config import Settings

        s = held.HeldSettings.from_settings(Settings(), account_idle=False)
        self.assertFalse(s.idle)
        self.assertEqual(s.poll_interval, 60.0)
        self.assertEqual(s.reconnect.initial, 1.0)
        self.assertLess(s.idle_refresh, 29 * 60)


class ConfigTests(SynchronousTestCase):
    """The ``[imap]`` keys of held connections."""

    def load(self, text):
        import os
        import tempfile

        from fido_tx.config import Roots, load_settings

        base = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, base)
        path = os.path.join(base, "fido.toml")
        with open(path, "w") as f:
            f.write(text)
        roots = Roots(etc=os.path.join(base, "etc"), deploy_globs=(),
                      home=os.path.join(base, "home"), is_root=False)
        return load_settings(path, {}, roots)[0]

    def test_defaults_and_values(self):
        s = self.load("")
        self.assertEqual((s.imap.idle_refresh, s.imap.max_connections_per_host), (600.0, 1000))
        s = self.load("[imap]\nidle_refresh = 120\nmax_connections_per_host = 5\n")
        self.assertEqual((s.imap.idle_refresh, s.imap.max_connections_per_host), (120, 5))
        self.assertEqual(held.HeldSettings.from_settings(s).idle_refresh, 120)

    def test_bad_values_name_the_key(self):
        from fido_tx.config import ConfigError

        for text, key in [("[imap]\nidle_refresh = 1740\n", "[imap] idle_refresh"),
                          ("[imap]\nidle_refresh = 0\n", "[imap] idle_refresh"),
                          ("[imap]\nmax_connections_per_host = 0\n",
                           "[imap] max_connections_per_host")]:
            e = self.assertRaises(ConfigError, self.load, text)
            self.assertIn(key, str(e))
            self.assertNotIn("\n", str(e))


class PoolTests(SynchronousTestCase):
    def test_on_idle_called_each_time_a_connection_starts_idling(self):
        calls = []
        pool = held.HeldPool(on_idle=lambda: calls.append(1))
        h = Harness(self, pool=pool)
        h.machine.start()
        h.turn()
        h.server.send(b"* 1 EXISTS")
        h.turn()
        self.assertEqual(len(calls), 2)
        self.assertEqual(pool.idling, 1)


class RetryAfterTests(SynchronousTestCase):
    """A delivery that answered 429 with Retry-After: the held connection
    stays, new mail is remembered, and no fetch starts inside the window."""

    def test_no_fetch_inside_a_sinks_retry_after_then_one_after_it(self):
        h = Harness(self, idle_refresh=600, poll_interval=3600)
        h.poll_results = [defer.succeed(SessionResult(
            account_id="a1", kind=errors.THROTTLED, message="webhook: 429",
            retry_after=120.0))]
        h.machine.start()
        h.turn()  # the catch-up poll is throttled
        self.assertEqual(len(h.polls), 1)
        self.assertEqual(h.machine.state, held.IDLING)
        h.turn(10)
        h.server.send(b"* 1 EXISTS")  # mail: remembered, not fetched yet
        h.turn()
        h.turn(50)
        h.server.send(b"* 2 EXISTS")
        h.turn()
        self.assertEqual(len(h.polls), 1)
        self.assertEqual(h.machine.state, held.IDLING)  # still listening
        h.turn(59.9)
        self.assertEqual(len(h.polls), 1)
        h.turn(0.1)
        self.assertEqual([t for t, _ in h.polls], [0.0, 120.0])
        self.assertEqual(len(h.servers), 1)
        self.assertEqual(h.machine.state, held.IDLING)

    def test_without_idle_the_wait_lasts_the_retry_after(self):
        h = Harness(self, idle_caps=False, poll_interval=60)
        h.poll_results = [defer.succeed(SessionResult(
            account_id="a1", kind=errors.THROTTLED, message="webhook: 429",
            retry_after=150.0))]
        h.machine.start()
        h.turn()
        for _ in range(18):
            h.turn(10)
        # not at 60 or 120 (due, but held off), at 150; then every 60 again
        self.assertEqual([t for t, _ in h.polls], [0.0, 150.0])
