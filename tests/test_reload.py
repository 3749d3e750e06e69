"""AccountsSource: debounce, load, shard filter, diff, apply, last good copy.

Clock + fake watcher + fake apply; the real ``accounts.load_accounts`` on real
temporary files unless a test needs a scripted loader.
"""

import json
import os
import stat
import threading

import pytest_twisted

from twisted.internet import task
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.accounts import model as accounts
from fido_tx.accounts import reload
from fido_tx.accounts.model import AccountsFileError, LoadResult, Problem


def entry(i, **over):
    e = {"id": f"acct-{i}", "host": "imap.example.com", "username": f"u{i}@example.com",
         "password": f"secret-{i}"}
    e.update(over)
    return e


def document(entries):
    return json.dumps({"accounts": entries}).encode()


class FakeWatcher:
    def __init__(self, path, callback):
        self.path = path
        self.callback = callback
        self.running = False
        self.stopped = False

    def start(self):
        self.running = True

    def stop(self):
        self.running = False
        self.stopped = True


class Harness(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "accounts.json")
        self.cache = os.path.join(self.dir, "state", "accounts.last-good")
        os.makedirs(os.path.dirname(self.cache))
        self.clock = task.Clock()
        self.applied = []
        self.reports = []
        self.watchers = []
        self.events = []

    def write(self, data):
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)

    def apply(self, accounts_, diff):
        self.applied.append((accounts_, diff))

    def report(self, kind, message, account):
        self.reports.append((kind, message, account))

    def factory(self, path, callback):
        w = FakeWatcher(path, callback)
        self.watchers.append(w)
        return w

    def source(self, **kw):
        kw.setdefault("report", self.report)
        kw.setdefault("cache_path", self.cache)
        src = reload.AccountsSource(self.clock, self.path, kw.pop("key_file", ""),
                                    self.apply, self.factory, **kw)
        src.log = Logger(namespace="fido_tx.accounts.reload", observer=self.events.append)
        return src

    def started(self, **kw):
        src = self.source(**kw)
        src.startService()
        self.addCleanup(lambda: src.running and src.stopService())
        return src

    def fire(self):
        """The (newest) accounts file watcher says: changed."""
        [w for w in self.watchers if w.path == self.path][-1].callback()

    def messages(self, level=None):
        return [formatEvent(e) for e in self.events
                if level is None or e["log_level"].name == level]

    def ids(self, accounts_):
        return [a.id for a in accounts_]


class ScriptedLoader:
    """Returns (or raises) the next scripted outcome; counts calls."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = []

    def __call__(self, path, key_file, base_dir=None):
        self.calls.append(path)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def result(*ids, problems=()):
    return LoadResult(
        tuple(accounts.Account(id=i, host="h", username="u", password="p") for i in ids),
        tuple(problems),
    )


class StartTests(Harness):
    def test_start_applies_everything_as_added_and_watches(self):
        self.write(document([entry(1), entry(2)]))
        src = self.started()
        [(accts, diff)] = self.applied
        self.assertEqual(self.ids(accts), ["acct-1", "acct-2"])
        self.assertEqual(self.ids(diff.added), ["acct-1", "acct-2"])
        self.assertEqual((diff.removed, diff.changed), ((), ()))
        self.assertEqual(src.accounts, accts)
        self.assertEqual([w.path for w in self.watchers], [self.path])
        self.assertTrue(self.watchers[0].running)
        self.assertIn(
            f"accounts loaded from {self.path}: 2 added, 0 removed, 0 changed, 2 total in",
            self.messages("info")[0],
        )

    def test_key_file_is_watched_too(self):
        key = os.path.join(self.dir, "fido.key")
        with open(key, "wb") as f:
            f.write(accounts.generate_key())
        self.write(accounts.encrypt_bytes(document([entry(1)]), key))
        self.started(key_file=key)
        self.assertEqual([w.path for w in self.watchers], [self.path, key])
        self.assertEqual(self.ids(self.applied[0][0]), ["acct-1"])

    def test_bad_file_without_cache_fails_with_one_line_error(self):
        self.write(b'{"accounts": [')
        src = self.source()
        with self.assertRaises(reload.AccountsStartupError) as cm:
            src.startService()
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        self.assertIn(self.path, message)
        self.assertIn("invalid JSON", message)
        self.assertIn("no last good copy", message)
        self.assertEqual(self.applied, [])
        self.assertEqual(self.watchers, [])

    def test_unreadable_file_without_cache_fails(self):
        self.write(b"{ not json")
        src = self.source(cache_path=None)
        self.assertRaises(reload.AccountsStartupError, src.load_initial)

    def test_bad_file_with_cache_runs_on_the_cache_and_reports(self):
        good = document([entry(1), entry(2)])
        self.write(good)
        first = self.started()
        first.stopService()
        with open(self.cache, "rb") as f:
            self.assertEqual(f.read(), good)
        self.applied.clear()

        self.write(b'{"accounts": [{"id": "acct-1", "ho')
        src = self.started()
        self.assertTrue(src.using_cache)
        [(accts, diff)] = self.applied
        self.assertEqual(self.ids(accts), ["acct-1", "acct-2"])
        [(kind, message, account)] = self.reports
        self.assertEqual((kind, account), ("config", None))
        self.assertIn(self.path, message)
        self.assertIn("last good copy", message)
        self.assertTrue(any("ACCOUNTS FILE UNUSABLE AT START" in m
                            for m in self.messages("error")))
        # the file is fixed: the next event applies it, the cache is left behind
        self.write(document([entry(1), entry(3)]))
        self.fire()
        self.clock.advance(0.2)
        self.assertFalse(src.using_cache)
        accts, diff = self.applied[-1]
        self.assertEqual(self.ids(accts), ["acct-1", "acct-3"])
        self.assertEqual(self.ids(diff.added), ["acct-3"])
        self.assertEqual(self.ids(diff.removed), ["acct-2"])
        self.assertEqual(len(self.reports), 1)

    def test_bad_file_and_bad_cache_fails(self):
        with open(self.cache, "wb") as f:
            f.write(b"not json")
        self.write(b"also not json")
        with self.assertRaises(reload.AccountsStartupError) as cm:
            self.source().load_initial()
        self.assertIn("unusable too", str(cm.exception))
        self.assertIn(self.cache, str(cm.exception))

    def test_bad_shard_is_refused_at_construction(self):
        self.assertRaises(ValueError, self.source, shard="3/2")


class CacheTests(Harness):
    def test_cache_holds_the_encrypted_bytes_mode_0600(self):
        key = os.path.join(self.dir, "fido.key")
        with open(key, "wb") as f:
            f.write(accounts.generate_key())
        token = accounts.encrypt_bytes(document([entry(1)]), key)
        self.write(token)
        self.started(key_file=key)
        with open(self.cache, "rb") as f:
            self.assertEqual(f.read(), token)
        self.assertEqual(stat.S_IMODE(os.stat(self.cache).st_mode), 0o600)
        self.assertEqual(
            [n for n in os.listdir(os.path.dirname(self.cache))], ["accounts.last-good"])

    def test_bad_file_does_not_touch_the_cache(self):
        good = document([entry(1)])
        self.write(good)
        src = self.started()
        self.write(b"{")
        self.fire()
        self.clock.advance(0.2)
        self.clock.advance(1.0)
        with open(self.cache, "rb") as f:
            self.assertEqual(f.read(), good)
        self.assertEqual(len(src.accounts), 1)

    def test_cache_follows_good_reloads(self):
        self.write(document([entry(1)]))
        self.started()
        newer = document([entry(1), entry(2)])
        self.write(newer)
        self.fire()
        self.clock.advance(0.2)
        with open(self.cache, "rb") as f:
            self.assertEqual(f.read(), newer)

    def test_unwritable_cache_is_a_warning_not_a_failure(self):
        self.write(document([entry(1)]))
        src = self.started(cache_path=os.path.join(self.dir, "no", "such", "dir", "c"))
        self.assertEqual(len(src.accounts), 1)
        self.assertTrue(any("cannot save the last good copy" in m
                            for m in self.messages("warn")))

    def test_cache_warning_once_then_recovery(self):
        cache_dir = os.path.join(self.dir, "later")
        self.write(document([entry(1)]))
        src = self.started(cache_path=os.path.join(cache_dir, "c"))
        for i in (2, 3):
            self.write(document([entry(1), entry(i)]))
            self.fire()
            self.clock.advance(0.2)
        self.assertEqual(
            len([m for m in self.messages("warn") if "cannot save" in m]), 1)
        os.makedirs(cache_dir)
        self.write(document([entry(1), entry(4)]))
        self.fire()
        self.clock.advance(0.2)
        self.assertTrue(any("saved to" in m and "again" in m for m in self.messages("info")))
        with open(src.cache_path, "rb") as f:
            self.assertEqual(f.read(), document([entry(1), entry(4)]))


class DebounceTests(Harness):
    def test_burst_of_events_is_one_load(self):
        loader = ScriptedLoader(result("a"))
        self.started(loader=loader)
        self.assertEqual(len(loader.calls), 1)
        for _ in range(10):
            self.fire()
            self.clock.advance(0.1)
        self.assertEqual(len(loader.calls), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(loader.calls), 2)
        self.clock.advance(10)
        self.assertEqual(len(loader.calls), 2)

    def test_endless_burst_is_loaded_after_max_wait(self):
        loader = ScriptedLoader(result("a"))
        self.started(loader=loader, max_wait=1.0)
        for _ in range(10):
            self.fire()
            self.clock.advance(0.15)
        # events every 0.15 s for 1.5 s: loaded once at 1.0 s, then again
        self.assertEqual(len(loader.calls), 2)

    def test_reload_now_loads_without_waiting(self):
        loader = ScriptedLoader(result("a"), result("a", "b"))
        src = self.started(loader=loader)
        self.fire()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        src.reload()
        self.assertEqual(len(loader.calls), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.ids(src.accounts), ["a", "b"])


class ReloadTests(Harness):
    def test_diff_is_passed_to_apply(self):
        self.write(document([entry(1), entry(2), entry(3)]))
        self.started()
        self.write(document([entry(1), entry(2, host="imap2.example.com"), entry(4)]))
        self.fire()
        self.clock.advance(0.2)
        accts, diff = self.applied[-1]
        self.assertEqual(self.ids(accts), ["acct-1", "acct-2", "acct-4"])
        self.assertEqual(self.ids(diff.added), ["acct-4"])
        self.assertEqual(self.ids(diff.removed), ["acct-3"])
        self.assertEqual(diff.removed[0].host, "imap.example.com")
        self.assertEqual(self.ids(diff.changed), ["acct-2"])
        self.assertEqual(diff.changed[0].host, "imap2.example.com")
        self.assertEqual(self.ids(diff.unchanged), ["acct-1"])
        self.assertTrue(any(
            m.startswith(f"accounts reloaded from {self.path}: 1 added, 1 removed, "
                         "1 changed, 3 total in ")
            for m in self.messages("info")))

    def test_unchanged_set_is_not_applied_and_logs_at_debug(self):
        self.write(document([entry(1)]))
        self.started()
        self.events.clear()
        self.write(document([entry(1)]))
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(len(self.applied), 1)
        self.assertEqual(self.messages("info"), [])
        self.assertTrue(any("no change" in m for m in self.messages("debug")))

    def test_half_written_file_is_retried_then_applied(self):
        whole = document([entry(1), entry(2)])
        self.write(whole[: len(whole) // 2])
        self.write(document([entry(1)]))
        src = self.started()
        self.write(whole[: len(whole) // 2])
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(len(self.applied), 1)  # not applied
        self.assertEqual(self.reports, [])  # not yet a problem
        self.assertEqual(self.messages("error"), [])
        self.write(whole)  # the writer finishes (no event seen)
        self.clock.advance(1.0)
        accts, diff = self.applied[-1]
        self.assertEqual(self.ids(diff.added), ["acct-2"])
        self.assertEqual(self.reports, [])
        self.assertIsNone(src.problem)

    def test_bad_file_keeps_last_good_and_reports_once_per_problem(self):
        self.write(document([entry(1)]))
        src = self.started()

        def bad(data):
            self.write(data)
            self.fire()
            self.clock.advance(0.2)
            self.clock.advance(1.0)

        bad(b'{"accounts": [}')
        self.assertEqual(len(self.applied), 1)
        self.assertEqual(self.ids(src.accounts), ["acct-1"])
        [(kind, message, account)] = self.reports
        self.assertEqual((kind, account), ("config", None))
        self.assertIn(self.path, message)
        self.assertIn("invalid JSON at line 1 column 15", message)
        self.assertIn("keeping the previous set of 1 accounts", message)
        [error] = self.messages("error")
        self.assertIn("invalid JSON at line 1 column 15", error)

        bad(b'{"accounts": [}')  # same problem: logged, not reported again
        self.assertEqual(len(self.reports), 1)
        self.assertTrue(any("still unusable" in m for m in self.messages("warn")))

        bad(b'{"accounts": {}}')  # another problem: reported
        self.assertEqual(len(self.reports), 2)
        self.assertIn("not a list", self.reports[-1][1])

        self.write(document([entry(1), entry(2)]))  # fixed
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(self.ids(src.accounts), ["acct-1", "acct-2"])
        self.assertIsNone(src.problem)

        bad(b'{"accounts": {}}')  # relapse after a fix: reported again
        self.assertEqual(len(self.reports), 3)
        self.assertEqual(self.ids(src.accounts), ["acct-1", "acct-2"])

    def test_missing_file_keeps_last_good(self):
        self.write(document([entry(1)]))
        src = self.started()
        os.unlink(self.path)
        self.fire()
        self.clock.advance(0.2)
        self.clock.advance(1.0)
        self.assertEqual(self.ids(src.accounts), ["acct-1"])
        self.assertEqual(len(self.reports), 1)
        self.assertIn("cannot read accounts file", self.reports[0][1])

    def test_bad_account_is_dropped_alone_and_reported_once(self):
        self.write(document([entry(1), entry(2)]))
        src = self.started()
        self.write(document([entry(1), entry(2, port="nine"), entry(3)]))
        self.fire()
        self.clock.advance(0.2)
        accts, diff = self.applied[-1]
        self.assertEqual(self.ids(accts), ["acct-1", "acct-3"])
        self.assertEqual(self.ids(diff.removed), ["acct-2"])
        [(kind, message, account)] = self.reports
        self.assertEqual((kind, account), ("config", "acct-2"))
        self.assertIn("port", message)
        self.assertIn(self.path, message)
        self.assertNotIn("secret-2", message)
        [error] = self.messages("error")
        self.assertIn("account acct-2: port", error)

        # touched, same problem: no new report
        self.write(document([entry(1), entry(2, port="nine"), entry(3), entry(4)]))
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(len(src.accounts), 3)

        # fixed, then broken again: reported again
        self.write(document([entry(1), entry(2), entry(3), entry(4)]))
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(self.ids(self.applied[-1][1].added), ["acct-2"])
        self.write(document([entry(1), entry(2, port="nine"), entry(3), entry(4)]))
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(len(self.reports), 2)

    def test_apply_failure_is_logged_and_next_change_diffs_against_old_set(self):
        self.write(document([entry(1)]))
        src = self.started()
        fail = [True]

        def apply(accts, diff):
            if fail[0]:
                fail[0] = False
                raise RuntimeError("scheduler refused (test)")
            self.applied.append((accts, diff))

        src._apply = apply
        self.write(document([entry(1), entry(2)]))
        self.fire()
        self.clock.advance(0.2)
        self.assertTrue(any("applying the new accounts set failed" in m
                            for m in self.messages("critical")))
        self.assertEqual(self.ids(src.accounts), ["acct-1"])
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(self.ids(self.applied[-1][1].added), ["acct-2"])

    def test_loader_crash_is_contained(self):
        loader = ScriptedLoader(result("a"), ZeroDivisionError("bug"), ZeroDivisionError("bug"),
                                result("a", "b"))
        src = self.started(loader=loader)
        self.fire()
        self.clock.advance(0.2)
        self.clock.advance(1.0)
        self.assertEqual(self.ids(src.accounts), ["a"])
        self.assertEqual(len(self.reports), 1)
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(self.ids(src.accounts), ["a", "b"])

    def test_report_failure_does_not_break_reload(self):
        def report(**kw):
            raise RuntimeError("reporter down (test)")

        self.write(document([entry(1), entry(2, port="x")]))
        src = self.started(report=report)
        self.assertEqual(self.ids(src.accounts), ["acct-1"])

    def test_stop_cancels_timers_and_stops_watchers(self):
        self.write(document([entry(1)]))
        src = self.started()
        self.fire()
        src.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(all(w.stopped for w in self.watchers))
        self.fire()  # a late event after stop is ignored
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ShardTests(Harness):
    def test_shards_split_the_accounts_and_their_problems(self):
        entries = [entry(i) for i in range(40)] + [
            entry(100, port="bad"), entry(101, port="bad")]
        self.write(document(entries))
        seen = []
        reported = []
        for k in (1, 2):
            self.applied.clear()
            self.reports.clear()
            self.watchers.clear()
            src = self.started(shard=f"{k}/2")
            ids = self.ids(src.accounts)
            self.assertEqual(ids, self.ids(self.applied[0][0]))
            self.assertTrue(all(accounts.in_shard(i, f"{k}/2") for i in ids))
            self.assertTrue(ids)  # both shards get some of 40
            seen.extend(ids)
            reported.extend(a for (_, _, a) in self.reports)
            src.stopService()
        self.assertEqual(sorted(seen), sorted(f"acct-{i}" for i in range(40)))
        self.assertEqual(sorted(reported), ["acct-100", "acct-101"])


class DeferredRunner:
    """A ``run_blocking`` that runs each job at once (as a worker thread
    would start it) but holds its result until the test releases it."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        from twisted.internet import defer

        try:
            outcome = (True, f(*args))
        except Exception as e:
            outcome = (False, e)
        d = defer.Deferred()
        self.jobs.append((outcome, d))
        return d

    def release(self):
        (ok, value), d = self.jobs.pop(0)
        if ok:
            d.callback(value)
        else:
            d.errback(value)


class OffThreadTests(Harness):
    def test_start_is_inline_and_reloads_go_through_run_blocking(self):
        runner = DeferredRunner()
        self.write(document([entry(1)]))
        src = self.started(run_blocking=runner)
        self.assertEqual(self.ids(src.accounts), ["acct-1"])
        self.assertEqual(runner.jobs, [])
        self.write(document([entry(1), entry(2)]))
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(len(runner.jobs), 1)
        self.assertEqual(len(self.applied), 1)  # not until the job is done
        runner.release()
        self.assertEqual(self.ids(self.applied[-1][1].added), ["acct-2"])
        # the blocking part did not count as reactor time
        self.assertLess(src.last_timing["reactor"], src.last_timing["blocking"] + 1)
        self.assertIn("wall", src.last_timing)

    def test_event_during_a_load_loads_again_afterwards(self):
        runner = DeferredRunner()
        self.write(document([entry(1)]))
        src = self.started(run_blocking=runner)
        self.write(document([entry(1), entry(2)]))
        self.fire()
        self.clock.advance(0.2)
        self.write(document([entry(1), entry(2), entry(3)]))
        self.fire()  # while loading
        self.assertEqual(self.clock.getDelayedCalls(), [])
        runner.release()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.2)
        runner.release()
        self.assertEqual(self.ids(src.accounts), ["acct-1", "acct-2", "acct-3"])
        self.assertEqual(self.ids(self.applied[-1][1].added), ["acct-3"])

    def test_bad_file_off_thread_is_retried_and_reported(self):
        runner = DeferredRunner()
        self.write(document([entry(1)]))
        src = self.started(run_blocking=runner)
        self.write(b"{")
        self.fire()
        self.clock.advance(0.2)
        runner.release()
        self.assertEqual(self.reports, [])
        self.clock.advance(1.0)
        runner.release()
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(self.ids(src.accounts), ["acct-1"])

    def test_result_arriving_after_stop_is_not_applied(self):
        runner = DeferredRunner()
        self.write(document([entry(1)]))
        src = self.started(run_blocking=runner)
        self.write(document([entry(1), entry(2)]))
        self.fire()
        self.clock.advance(0.2)
        src.stopService()
        runner.release()
        self.assertEqual(len(self.applied), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# ---------------------------------------------------------------------------
# with the real reactor: worker thread and a real file watcher


@pytest_twisted.inlineCallbacks
def test_real_reactor_reloads_off_thread_with_a_real_watcher(tmp_path):
    from twisted.internet import defer, reactor

    from fido_tx.accounts import watch

    path = str(tmp_path / "accounts.json")
    with open(path, "wb") as f:
        f.write(document([entry(1)]))
    applied = []
    apply_threads = set()
    loader_threads = []
    done = defer.Deferred()

    def apply(accts, diff):
        apply_threads.add(threading.current_thread().name)
        applied.append((accts, diff))
        if len(applied) == 2 and not done.called:
            done.callback(None)

    def loader(p, key_file, base_dir=None):
        loader_threads.append(threading.current_thread().name)
        return accounts.load_accounts(p, key_file)

    src = reload.AccountsSource(
        reactor, path, "", apply,
        lambda p, cb: watch.make_watcher(reactor, p, cb, interval=0.02),
        loader=loader, debounce=0.02, cache_path=str(tmp_path / "cache"))
    src.startService()
    try:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(document([entry(1), entry(2)]))
        os.replace(tmp, path)
        yield done.addTimeout(10, reactor)
    finally:
        src.stopService()
    assert [a.id for a in applied[-1][1].added] == ["acct-2"]
    main = threading.current_thread().name
    assert apply_threads == {main}
    assert loader_threads[0] == main  # the load at start is inline
    assert loader_threads[1] != main  # reloads run in the thread pool
    with open(str(tmp_path / "cache"), "rb") as f:
        assert f.read() == document([entry(1), entry(2)])


class ScriptedLoaderTests(Harness):
    def test_entry_without_id_is_reported_without_account(self):
        bad = Problem(None, "id", "missing (required)", index=3)
        loader = ScriptedLoader(result("a", problems=[bad]))
        src = self.started(loader=loader, shard="1/2")
        [(kind, message, account)] = self.reports
        self.assertEqual((kind, account), ("config", None))
        self.assertIn("accounts[3] (no valid id): id: missing (required)", message)
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(src.shard, "1/2")

    def test_error_retry_then_success_reports_nothing(self):
        loader = ScriptedLoader(result("a"), AccountsFileError("x: truncated token"),
                                result("a", "b"))
        src = self.started(loader=loader)
        self.fire()
        self.clock.advance(0.2)
        self.assertEqual(self.ids(src.accounts), ["a"])
        self.clock.advance(1.0)
        self.assertEqual(self.ids(src.accounts), ["a", "b"])
        self.assertEqual(self.reports, [])
        self.assertEqual(len(loader.calls), 3)


class StartWindowTests(Harness):
    def test_change_between_initial_load_and_start_is_not_missed(self):
        self.write(document([entry(1)]))
        src = self.source()
        src.load_initial()  # the composition root does this early
        self.write(document([entry(1), entry(2), entry(3)]))
        src.startService()
        self.addCleanup(src.stopService)
        self.clock.advance(0.2)
        self.assertEqual(self.ids(src.accounts), ["acct-1", "acct-2", "acct-3"])

    def test_no_extra_load_when_nothing_changed(self):
        loader = ScriptedLoader(result("a"))
        self.write(b"anything")
        src = self.started(loader=loader)
        self.clock.advance(5)
        self.assertEqual(len(loader.calls), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        src.stopService()


class FirstStartTests(Harness):
    """Zero-config: on a first start the web application has not written the
    accounts file yet; Fido runs with no accounts and picks the file up."""

    def test_missing_file_without_cache_starts_with_no_accounts(self):
        src = self.started()
        self.assertEqual(src.accounts, ())
        self.assertEqual(self.applied, [])
        self.assertTrue(any("does not exist yet" in m for m in self.messages("warn")))
        self.assertEqual(self.reports, [])

    def test_file_written_later_is_applied(self):
        src = self.started()
        self.write(document([entry(1), entry(2)]))
        self.fire()
        self.clock.advance(5)
        self.assertEqual(self.ids(src.accounts), ["acct-1", "acct-2"])
        [(accounts_, diff)] = self.applied
        self.assertEqual(len(diff.added), 2)

    def test_missing_file_with_a_last_good_copy_runs_on_the_copy(self):
        first = self.started()
        self.write(document([entry(1)]))
        self.fire()
        self.clock.advance(5)
        first.stopService()
        os.remove(self.path)
        src = self.started()
        self.assertEqual(self.ids(src.accounts), ["acct-1"])
        self.assertTrue(src.using_cache)


class PermissionWarningTests(Harness):
    def test_plain_accounts_file_readable_by_others_is_warned_about_once(self):
        self.write(document([entry(1)]))
        os.chmod(self.path, 0o644)
        src = self.started()
        self.write(document([entry(1), entry(2)]))
        os.chmod(self.path, 0o644)
        self.fire()
        self.clock.advance(5)
        self.assertEqual(len(src.accounts), 2)
        warnings = [m for m in self.messages("warn") if "group or others" in m]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("passwords in clear", warnings[0])
        self.assertIn("644", warnings[0])

    def test_private_files_are_not_warned_about(self):
        self.write(document([entry(1)]))
        os.chmod(self.path, 0o600)
        self.started()
        self.assertEqual([m for m in self.messages("warn") if "group or others" in m], [])

    def test_key_file_readable_by_group_is_warned_about(self):
        from cryptography.fernet import Fernet

        key_path = os.path.join(self.dir, "fido.key")
        key = Fernet.generate_key()
        with open(key_path, "wb") as f:
            f.write(key + b"\n")
        os.chmod(key_path, 0o640)
        self.write(Fernet(key).encrypt(document([entry(1)])))
        src = self.started(key_file=key_path)
        self.assertEqual(len(src.accounts), 1)
        [warning] = [m for m in self.messages("warn") if "group or others" in m]
        self.assertIn("key file", warning)
