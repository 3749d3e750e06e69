"""StatusTracker: reports on state change only, account hash, one log line per session."""

import json

from hypothesis import given, settings as hsettings, strategies as st
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource

from fido_tx import errors
from fido_tx.accounts.model import Account
from fido_tx.config import ReporterSettings
from fido_tx.observe.metrics import Metrics
from fido_tx.outcome import SessionResult
from fido_tx.observe.report import Reporter
from fido_tx.observe.status import GLOBAL, StatusTracker
from fido_tx.testing import FakeRedis, FakeReporter, FakeScheduler

PASSWORD = "s3cret-Passw0rd"
ACCOUNT = Account(
    id="acme-support", host="imap.example.com", port=993, username="support@acme.test",
    password=PASSWORD,
)


def ok(account_id="acme-support", **kw):
    kw.setdefault("fetched", 12)
    kw.setdefault("bytes", 340512)
    kw.setdefault("marked", 12)
    kw.setdefault("seconds", 1.42)
    return SessionResult(account_id=account_id, **kw)


def failed(kind=errors.AUTH, message="LOGIN rejected: [AUTHENTICATIONFAILED] Authentication failed.",
           account_id="acme-support", **kw):
    return SessionResult(account_id=account_id, kind=kind, message=message,
                         debug=kw.pop("debug", "S: a1 NO [AUTHENTICATIONFAILED]"), **kw)


def make(**kw):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    store = FakeRedis()
    reporter = kw.pop("reporter", None) or FakeReporter()
    events = []
    tracker = StatusTracker(
        clock, store, reporter, kw.pop("metrics", None), redis=store,
        log=Logger(namespace="test", observer=events.append), **kw
    )
    return tracker, clock, store, reporter, events


class ReportOnChangeTests(SynchronousTestCase):
    def test_ok_auth_auth_ok_sends_exactly_auth_then_recovered(self):
        tracker, clock, store, reporter, events = make()
        tracker.record(ACCOUNT, ok())
        clock.advance(60)
        tracker.record(ACCOUNT, failed())
        clock.advance(600)
        tracker.record(ACCOUNT, failed())
        clock.advance(600)
        tracker.record(ACCOUNT, ok())
        self.assertEqual(reporter.kinds, [("acme-support", "auth"), ("acme-support", "recovered")])
        auth, recovered = reporter.reports
        self.assertEqual(auth["message"], "LOGIN rejected: [AUTHENTICATIONFAILED] Authentication failed.")
        self.assertIn("S: a1 NO [AUTHENTICATIONFAILED]", auth["debug"])
        self.assertIn("server: imap.example.com:993", auth["debug"])
        self.assertIn("since: 2023-11-14T22:14:20.000Z", auth["debug"])
        self.assertEqual(auth["occurred_at"], "2023-11-14T22:14:20.000Z")
        self.assertIn("recovered from auth", recovered["message"])
        self.assertIn("LOGIN rejected", recovered["message"])
        self.assertIn("2 failed session(s)", recovered["debug"])
        self.assertIn(PASSWORD, auth["secrets"])  # with its other forms (fido_tx.scrub)

    def test_first_result_ok_is_not_reported_first_error_is(self):
        tracker, clock, store, reporter, events = make()
        tracker.record(ACCOUNT, ok())
        tracker.record(Account(id="b", host="h", username="u", password="p"), failed(errors.DNS, "no such host", account_id="b"))
        self.assertEqual(reporter.kinds, [("b", "dns")])

    def test_a_different_error_kind_is_reported_the_same_one_is_not(self):
        tracker, clock, store, reporter, events = make()
        for r in [failed(errors.CONNECT, "refused"), failed(errors.CONNECT, "refused again"),
                  failed(errors.TIMEOUT, "no greeting"), failed(errors.TIMEOUT, "no greeting"),
                  failed(errors.CONNECT, "refused")]:
            tracker.record(ACCOUNT, r)
        self.assertEqual([k for _, k in reporter.kinds], ["connect", "timeout", "connect"])

    def test_redis_failures_are_not_reported_per_account(self):
        tracker, clock, store, reporter, events = make()
        store.connected = False
        accounts = [Account(id=f"a{i}", host="h", username="u", password="p") for i in range(50)]
        for a in accounts:
            tracker.record(a, ok(a.id))
        tracker.redis_state(False)
        for a in accounts:
            tracker.record(a, failed(errors.REDIS, "Redis is unreachable", account_id=a.id))
        self.assertEqual(reporter.reports, [])
        self.assertEqual(tracker.summary(), {"redis": 50})
        clock.advance(30)  # still down after the grace period: one report
        self.assertEqual(reporter.kinds, [(GLOBAL, "redis")])
        store.connected = True
        tracker.redis_state(True)
        for a in accounts:
            tracker.record(a, ok(a.id))
        self.assertEqual(reporter.kinds, [(GLOBAL, "redis"), (GLOBAL, "recovered")])
        self.assertEqual(tracker.summary(), {"ok": 50})

    def test_short_redis_outage_is_not_reported(self):
        tracker, clock, store, reporter, events = make()
        tracker.redis_state(False)
        clock.advance(5)
        tracker.redis_state(True)
        clock.advance(100)
        self.assertEqual(reporter.reports, [])

    def test_auth_then_redis_then_ok_still_reports_recovered(self):
        tracker, clock, store, reporter, events = make()
        store.connected = False
        tracker.record(ACCOUNT, failed())
        tracker.record(ACCOUNT, failed(errors.REDIS, "down"))
        tracker.record(ACCOUNT, failed())
        tracker.record(ACCOUNT, ok())
        self.assertEqual([k for _, k in reporter.kinds], ["auth", "recovered"])

    def test_redis_error_while_connected_is_reported_once_globally(self):
        tracker, clock, store, reporter, events = make()
        for i in range(3):
            tracker.record(ACCOUNT, failed(errors.REDIS, "OOM command not allowed"))
        tracker.record(ACCOUNT, ok())
        self.assertEqual(reporter.kinds, [(GLOBAL, "redis"), (GLOBAL, "recovered")])

    def test_too_large_is_reported_once_per_new_uid_set(self):
        tracker, clock, store, reporter, events = make()
        tracker.record(ACCOUNT, ok(too_large=(7, 9)))
        tracker.record(ACCOUNT, ok(too_large=(7, 9)))
        tracker.record(ACCOUNT, ok(too_large=(7, 9, 12)))
        self.assertEqual([k for _, k in reporter.kinds], ["too_large", "too_large"])
        self.assertIn("UIDs 7, 9", reporter.reports[0]["message"])
        self.assertIn("UIDs 12", reporter.reports[1]["message"])
        self.assertEqual(tracker.summary(), {"ok": 1})

    def test_backlog_is_reported_once_per_change(self):
        tracker, clock, store, reporter, events = make()
        tracker.backlog_state(True, 100001)
        tracker.backlog_state(True, 100002)
        tracker.backlog_state(False, 99000)
        tracker.backlog_state(False, 98000)
        self.assertEqual(reporter.kinds, [(GLOBAL, "redis"), (GLOBAL, "recovered")])
        self.assertIn("100001", reporter.reports[0]["message"])

    def test_config_problems_from_the_accounts_source(self):
        tracker, clock, store, reporter, events = make()
        tracker.report_config(kind="config", message="accounts.json: bad JSON at line 3", account=None)
        tracker.report_config(kind="config", message="accounts.json: acme: port: not a number",
                              account="acme")
        self.assertEqual(reporter.kinds, [(GLOBAL, "config"), ("acme", "config")])
        self.assertEqual(reporter.reports[0]["message"], "accounts.json: bad JSON at line 3")

    def test_dry_run_writes_and_reports_nothing(self):
        tracker, clock, store, reporter, events = make(dry_run=True)
        tracker.record(ACCOUNT, failed())
        tracker.record(ACCOUNT, ok())
        self.assertEqual((store.sessions, store.updates, reporter.reports), ([], [], []))
        self.assertEqual(tracker.summary(), {"ok": 1})


class StoreTests(SynchronousTestCase):
    def test_every_result_is_recorded_and_failing_since_follows_the_streak(self):
        tracker, clock, store, reporter, events = make()
        tracker.record(ACCOUNT, ok())
        tracker.record(ACCOUNT, failed())
        clock.advance(10)
        tracker.record(ACCOUNT, failed(errors.CONNECT, "refused"))
        tracker.record(ACCOUNT, ok())
        self.assertEqual(len(store.sessions), 4)
        self.assertEqual(
            [f["failing_since"] for _, f in store.updates if "failing_since" in f],
            ["", "2023-11-14T22:13:20.000Z", ""],
        )

    def test_forget_and_summary(self):
        tracker, clock, store, reporter, events = make()
        tracker.record(ACCOUNT, ok())
        tracker.record(Account(id="b", host="h", username="u", password="p"), failed(account_id="b"))
        self.assertEqual(tracker.summary(), {"ok": 1, "auth": 1})
        tracker.forget("b")
        self.assertEqual(tracker.summary(), {"ok": 1})

    def test_metrics_observe_every_session(self):
        metrics = Metrics()
        tracker, clock, store, reporter, events = make(metrics=metrics)
        tracker.record(ACCOUNT, ok())
        tracker.record(ACCOUNT, failed())
        self.assertEqual(metrics.registry.get_sample_value("fido_sessions_total", {"outcome": "ok"}), 1)
        self.assertEqual(metrics.registry.get_sample_value("fido_sessions_total", {"outcome": "auth"}), 1)


class LogTests(SynchronousTestCase):
    def test_one_line_per_session_with_fields(self):
        tracker, clock, store, reporter, events = make()
        tracker.record(ACCOUNT, ok())
        self.assertEqual(len(events), 1)
        e = events[0]
        self.assertEqual(formatEvent(e), "acme-support ok: 12 messages, 340512 bytes, marked 12, 1.42 s")
        for field, value in dict(account_id="acme-support", outcome="ok", messages=12,
                                 bytes=340512, seconds=1.42, kind=None).items():
            self.assertEqual(e[field], value)

    def test_failure_line_with_retry_and_a_state_change_line(self):
        scheduler = None
        tracker, clock, store, reporter, events = make()
        tracker.scheduler = scheduler = FakeScheduler()
        tracker.record(ACCOUNT, ok())
        scheduler.due["acme-support"] = clock.seconds() + 600
        tracker.record(ACCOUNT, failed())
        lines = [formatEvent(e) for e in events]
        self.assertEqual(
            lines[1],
            "acme-support failed (auth): LOGIN rejected: [AUTHENTICATIONFAILED] "
            "Authentication failed.; retry in 600 s",
        )
        self.assertEqual(events[1]["kind"], "auth")
        self.assertEqual(events[1]["outcome"], "auth")
        self.assertEqual(events[1]["retry_in"], 600)
        self.assertEqual(lines[2], "acme-support state ok -> auth: LOGIN rejected: "
                         "[AUTHENTICATIONFAILED] Authentication failed.")
        self.assertEqual(events[2]["log_level"].name, "warn")
        tracker.record(ACCOUNT, failed())
        self.assertEqual(len(events), 4)  # the same failure again: the session line only
        tracker.record(ACCOUNT, ok())
        self.assertIn("acme-support state auth -> ok", formatEvent(events[-1]))

    def test_json_log_lines_carry_the_fields(self):
        import io

        from fido_tx.observe.logs import LineObserver

        tracker, clock, store, reporter, events = make()
        tracker.record(ACCOUNT, ok())
        tracker.record(ACCOUNT, failed())
        stream = io.StringIO()
        observer = LineObserver(stream, "json")
        for e in events:
            observer(e)
        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual(len(records), 3)
        self.assertEqual(records[0]["message"],
                         "acme-support ok: 12 messages, 340512 bytes, marked 12, 1.42 s")
        self.assertEqual(
            {k: records[0][k] for k in ("account_id", "outcome", "messages", "bytes", "seconds")},
            {"account_id": "acme-support", "outcome": "ok", "messages": 12, "bytes": 340512,
             "seconds": 1.42},
        )
        self.assertTrue(records[1]["message"].startswith("acme-support failed (auth): LOGIN rejected"))
        self.assertEqual((records[1]["kind"], records[1]["outcome"]), ("auth", "auth"))

    def test_log_lines_never_contain_the_password(self):
        tracker, clock, store, reporter, events = make()
        tracker.record(ACCOUNT, failed())
        tracker.record(ACCOUNT, ok())
        for e in events:
            self.assertNotIn(PASSWORD, formatEvent(e))
            self.assertNotIn(PASSWORD, repr(e))


class Recorder(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.bodies = []

    def render_POST(self, request):
        self.bodies.append(request.content.read())
        return b"{}"


class WithRealReporterTests(SynchronousTestCase):
    def test_sequence_posts_two_reports_without_the_password(self):
        rec = Recorder()
        clock = task.Clock()
        reporter = Reporter(
            clock, ReporterSettings(url="http://web.test/fido", token="tkn-0123456789"),
            http_client=StubTreq(rec),
        )
        reporter.startService()
        tracker, _, store, _, events = make(reporter=reporter)
        leaky = failed(debug=f"C: a1 LOGIN support@acme.test {PASSWORD}\r\nS: a1 NO")
        for r in [ok(), leaky, leaky, ok()]:
            tracker.record(ACCOUNT, r)
            clock.advance(0)
        self.assertEqual([json.loads(b)["kind"] for b in rec.bodies], ["auth", "recovered"])
        for body in rec.bodies:
            self.assertNotIn(PASSWORD.encode(), body)
            self.assertNotIn(b"tkn-0123456789", body)
            self.assertEqual(set(json.loads(body)), {"account", "kind", "message", "debug", "occurred_at"})


class ReportPropertyTests(SynchronousTestCase):
    @hsettings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from([None, errors.AUTH, errors.CONNECT, errors.TLS, errors.REDIS]),
                    max_size=30))
    def test_reports_follow_the_reportable_state(self, kinds):
        tracker, clock, store, reporter, events = make()
        store.connected = False  # redis results come with a disconnected store
        for kind in kinds:
            clock.advance(60)
            tracker.record(ACCOUNT, ok() if kind is None else failed(kind, f"{kind} failed"))
        sent = [k for a, k in reporter.kinds if a == ACCOUNT.id]
        # never the same kind twice in a row, and "recovered" only after a failure report
        for before, after in zip(sent, sent[1:]):
            self.assertNotEqual(before, after)
        if sent:
            self.assertNotEqual(sent[0], "recovered")
        # what the web application was told last matches the last informative result
        informative = [k for k in kinds if k != errors.REDIS]
        if not informative:
            self.assertEqual(sent, [])
        elif informative[-1] is None:
            self.assertTrue(not sent or sent[-1] == "recovered", sent)
        else:
            self.assertEqual(sent[-1], informative[-1])
        # one report per change of the informative state (first ok is no change)
        changes, state = 0, None
        for k in informative:
            if k != state and not (state is None and k is None):
                changes += 1
            state = k
        self.assertEqual(len(sent), changes)
        # one session log line per result, plus one line per state change
        session_lines = [e for e in events if "outcome" in e and "old_state" not in e]
        self.assertEqual(len(session_lines), len(kinds))
