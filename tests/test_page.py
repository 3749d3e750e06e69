"""The status page: what it shows, escaping, filters, paging, the account
page, basic authentication, and its speed with 10,000 accounts."""

import base64
import os
import time

from hypothesis import given, settings as hsettings, strategies as st
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import config, errors
from fido_tx.accounts.model import Account
from fido_tx.observe.health import Health
from fido_tx.observe.history import SessionLog
from fido_tx.observe.metrics import Metrics
from fido_tx.observe.status import StatusTracker
from fido_tx.observe.view import StatusView
from fido_tx.observe.rate import PerMinute
from fido_tx.observe.web import make_site
from fido_tx.outcome import SessionResult
from fido_tx.schedule.scheduler import Scheduler
from fido_tx.testing import FakeBacklog, FakeRedis
from tests.support.fake_redis import FakeRedisExecute

EVIL = '<script>alert("x")</script>'


class FakeScheduler:
    def __init__(self, accounts):
        self.accounts = {a.id: a for a in accounts}
        self.last_completion_at = None
        self.running_count = 0
        self.paused_reasons = frozenset()

    def lag(self):
        return 0.0


class FakeInstances:
    instances = [{"id": "web1:4242", "accounts": "3", "sessions": "1", "version": "1.0"}]


def world(n_ok=2, failing=(("broken", errors.AUTH, "[AUTHENTICATIONFAILED] Invalid credentials"),),
          credentials=None):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    accounts = [Account(id=f"good{i:05d}", host="h") for i in range(n_ok)]
    accounts += [Account(id=a, host="h", delivery="webhook") for a, _, _ in failing]
    accounts.append(Account(id="fresh", host="h"))
    tracker = StatusTracker(clock, None, None)
    redis = FakeRedisExecute()
    sessions = SessionLog(clock, redis)
    ring = PerMinute(clock)
    for a in accounts[:n_ok]:
        result = SessionResult(a.id, fetched=3, bytes=300)
        tracker.record(a, result)
        sessions.record(a, result)
        ring.record(a, result)
    for account_id, kind, message in failing:
        clock.advance(1)
        account = next(a for a in accounts if a.id == account_id)
        result = SessionResult(account_id, kind=kind, message=message)
        tracker.record(account, result)
        sessions.record(account, result)
    scheduler = FakeScheduler(accounts)
    backlog = FakeBacklog()
    backlog.last_length = 1234
    view = StatusView(clock, tracker, scheduler=scheduler, redis=FakeRedis(), backlog=backlog,
                      throughput=ring, instances=FakeInstances(), sessions=sessions)
    site = make_site(Metrics(), Health(clock, scheduler, FakeRedis()), view, credentials)
    return StubTreq(site.resource), view, tracker, clock


def get(stub, testcase, path, headers=None):
    response = testcase.successResultOf(stub.get("http://fido.test" + path, headers=headers))
    body = testcase.successResultOf(response.content()).decode("utf-8")
    return response, body


class PageTests(SynchronousTestCase):
    def test_failing_first_with_the_servers_words_chart_backlog_instances(self):
        stub, *_ = world()
        response, body = get(stub, self, "/")
        self.assertEqual(response.code, 200)
        self.assertIn(b"text/html", response.headers.getRawHeaders(b"content-type")[0])
        rows = body.split("<tbody>")[-1]
        self.assertLess(rows.index("broken"), rows.index("good00000"))
        self.assertLess(rows.index("fresh"), rows.index("good00000"))  # not run yet: middle
        self.assertIn("[AUTHENTICATIONFAILED] Invalid credentials", body)
        self.assertIn("<svg", body)
        self.assertIn("1234", body)  # backlog
        self.assertIn("web1:4242", body)
        self.assertIn("polled", body)
        self.assertIn("imap → webhook", body)
        self.assertNotIn("<script", body.replace(EVIL, ""))  # no script of ours

    def test_everything_from_accounts_and_servers_is_escaped(self):
        stub, *_ = world(failing=((f"ev{EVIL}il", errors.PROTOCOL, f"BAD {EVIL}"),))
        _, body = get(stub, self, "/")
        self.assertNotIn(EVIL, body)
        self.assertIn("&lt;script&gt;", body)
        _, body = get(stub, self, "/account/" + "ev%3Cscript%3Ealert(%22x%22)%3C%2Fscript%3Eil")
        self.assertNotIn(EVIL, body)
        self.assertIn("BAD &lt;script&gt;", body)

    def test_filters_and_search(self):
        stub, *_ = world(n_ok=3, failing=(("b1", "auth", "no"), ("b2", "connect", "refused")))
        _, body = get(stub, self, "/?state=failing")
        rows = body.split("<tbody>")[-1]
        self.assertIn("b1", rows)
        self.assertIn("b2", rows)
        self.assertNotIn("good00000", rows)
        _, body = get(stub, self, "/?state=connect")
        rows = body.split("<tbody>")[-1]
        self.assertNotIn(">b1<", rows)
        self.assertIn(">b2<", rows)
        _, body = get(stub, self, "/?q=GOOD00002")
        rows = body.split("<tbody>")[-1]
        self.assertIn("good00002", rows)
        self.assertNotIn("good00001", rows)
        self.assertIn('href="/?state=auth&amp;q=GOOD00002"', body)  # a chip per failing kind

    def test_paged_by_a_hundred(self):
        stub, *_ = world(n_ok=250)
        _, body = get(stub, self, "/?page=3")
        self.assertIn("page 3 of 3", body)
        self.assertIn("good00249", body)
        self.assertNotIn("good00100<", body)
        _, body = get(stub, self, "/?page=banana")
        self.assertIn("page 1 of 3", body)

    def test_an_instance_wide_problem_is_a_banner_and_redis_down_shows(self):
        stub, view, tracker, _clock = world()
        tracker.report_global(errors.REDIS, f"the Redis stream holds 9 entries {EVIL}",
                              key="backlog")
        view.redis.connected = False
        _, body = get(stub, self, "/")
        self.assertIn('<div class="problem"><b>redis</b>: the Redis stream holds 9 entries', body)
        self.assertNotIn(EVIL, body)
        self.assertIn("Redis DISCONNECTED", body)

    def test_account_page_lists_recent_sessions(self):
        stub, _view, tracker, _clock = world()
        response, body = get(stub, self, "/account/broken")
        self.assertEqual(response.code, 200)
        self.assertIn("Recent sessions", body)
        self.assertIn("[AUTHENTICATIONFAILED] Invalid credentials", body)
        _, body = get(stub, self, "/account/good00001")
        self.assertIn("300", body)  # bytes of its session
        response, body = get(stub, self, "/account/nobody")
        self.assertEqual(response.code, 404)

    def test_a_state_change_shows_on_the_next_request(self):
        stub, view, tracker, clock = world()
        _, body = get(stub, self, "/?state=failing")
        self.assertNotIn("good00001", body.split("<tbody>")[-1])
        tracker.record(view.scheduler.accounts["good00001"],
                       SessionResult("good00001", kind="timeout", message="no answer"))
        _, body = get(stub, self, "/?state=failing")
        self.assertIn("good00001", body.split("<tbody>")[-1])

    def test_ten_thousand_accounts_answer_in_under_100_ms(self):
        self._time_ten_thousand(real_scheduler=False)

    def test_ten_thousand_accounts_with_the_real_scheduler(self):
        self._time_ten_thousand(real_scheduler=True)

    def _time_ten_thousand(self, real_scheduler):
        failing = tuple((f"bad{i:04d}", errors.AUTH, "[AUTHENTICATIONFAILED] no") for i in range(500))
        stub, view, tracker, clock = world(n_ok=9_500, failing=failing)
        if real_scheduler:  # its ``accounts`` is a copy of 10,000 entries per call
            scheduler = Scheduler(clock, lambda account: defer.Deferred(), workers=8,
                                  poll_interval=300, backoff=config.BackoffSettings())
            scheduler.set_accounts(list(view.scheduler.accounts.values()))
            view.scheduler = scheduler
        timings = {}
        for path in ("/", "/?page=50", "/?state=failing", "/?q=good0999", "/account/bad0007"):
            get(stub, self, path)  # the first request sorts
            runs = []
            for _ in range(7):
                started = time.perf_counter()
                get(stub, self, path)
                runs.append((time.perf_counter() - started) * 1000)
            timings[path] = sorted(runs)[len(runs) // 2]  # the median: the machine is shared
        # a state change forces a new order: the worst case
        runs = []
        for i in range(7):
            account_id = f"good{i:05d}"
            tracker.record(view.scheduler.accounts[account_id],
                           SessionResult(account_id, kind="timeout", message="slow"))
            started = time.perf_counter()
            get(stub, self, "/")
            runs.append((time.perf_counter() - started) * 1000)
        timings["/ after a change"] = sorted(runs)[len(runs) // 2]
        print(f"\nstatus page, 10,000 accounts ({type(view.scheduler).__name__}), "
              "ms per request: " + ", ".join(
            f"{p} {ms:.1f}" for p, ms in timings.items()))
        limit = 100 if not os.environ.get("FIDO_SLOW_MACHINE") else 300
        self.assertLess(max(timings.values()), limit, timings)


class AuthTests(SynchronousTestCase):
    def _auth(self, user, password):
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": [f"Basic {token}"]}

    def test_the_page_needs_the_password_and_healthz_and_metrics_do_not(self):
        stub, *_ = world(credentials=("ops", "correct horse"))
        response, _ = get(stub, self, "/")
        self.assertEqual(response.code, 401)
        self.assertIn(b"Basic", response.headers.getRawHeaders(b"www-authenticate")[0])
        response, _ = get(stub, self, "/account/broken")
        self.assertEqual(response.code, 401)
        response, _ = get(stub, self, "/", self._auth("ops", "wrong"))
        self.assertEqual(response.code, 401)
        response, body = get(stub, self, "/", self._auth("ops", "correct horse"))
        self.assertEqual(response.code, 200)
        self.assertIn("broken", body)
        response, _ = get(stub, self, "/account/broken", self._auth("ops", "correct horse"))
        self.assertEqual(response.code, 200)
        self.assertEqual(get(stub, self, "/healthz")[0].code, 200)
        self.assertEqual(get(stub, self, "/metrics")[0].code, 200)

    def test_garbage_credentials_are_refused(self):
        stub, *_ = world(credentials=("ops", "pw"))
        for header in ("Basic !!!", "Bearer x", "Basic " + base64.b64encode(b"opspw").decode()):
            self.assertEqual(get(stub, self, "/", {"Authorization": [header]})[0].code, 401)


class ConfigTests(SynchronousTestCase):
    def _load(self, tmp, http):
        path = os.path.join(tmp, "fido.toml")
        with open(path, "w") as f:
            f.write(f'[fido]\naccounts_file = "a.json"\n[http]\n{http}\n')
        return config.load_settings(path)[0]

    def test_listening_beyond_loopback_needs_a_password(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        with self.assertRaises(config.ConfigError) as e:
            self._load(tmp, 'listen = "tcp:9119"')
        message = str(e.exception)
        self.assertEqual(len(message.splitlines()), 1)
        self.assertIn("[http] listen", message)
        self.assertIn("password_file", message)
        with open(os.path.join(tmp, "pw"), "w") as f:
            f.write("s3cret\n")
        settings = self._load(tmp, 'listen = "tcp:9119"\nusername = "ops"\npassword_file = "pw"')
        self.assertEqual(config.read_password(settings.http.password_file), "s3cret")
        self.assertEqual(self._load(tmp, 'listen = "unix:/tmp/fido.sock"').http.username, "")

    def test_half_a_credential_or_an_empty_password_file_is_an_error(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        with self.assertRaises(config.ConfigError):
            self._load(tmp, 'username = "ops"')
        open(os.path.join(tmp, "empty"), "w").close()
        with self.assertRaises(config.ConfigError) as e:
            self._load(tmp, 'username = "ops"\npassword_file = "empty"')
        self.assertIn("empty", str(e.exception))
        with self.assertRaises(config.ConfigError):
            self._load(tmp, 'username = "ops"\npassword_file = "missing"')

    def test_recent_sessions(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        self.assertEqual(self._load(tmp, "").http.recent_sessions, 50)
        self.assertEqual(self._load(tmp, "recent_sessions = 0").http.recent_sessions, 0)
        with self.assertRaises(config.ConfigError) as e:
            self._load(tmp, "recent_sessions = -1")
        self.assertIn("[http] recent_sessions", str(e.exception))


class EscapingProperties(SynchronousTestCase):
    @given(account_id=st.text(min_size=1, max_size=30).filter(lambda t: t.strip("/") == t),
           error=st.text(max_size=60))
    @hsettings(max_examples=60, deadline=None)
    def test_no_markup_from_an_account_or_a_server_reaches_the_page(self, account_id, error):
        marker = "<b id=x>"
        stub, *_ = world(n_ok=1, failing=((account_id + marker, errors.PROTOCOL,
                                           error + marker),))
        _, body = get(stub, self, "/")
        self.assertNotIn(marker, body)
        self.assertIn("&lt;b id=x&gt;", body)
