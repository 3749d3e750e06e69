"""File watchers: one contract, checked against every watcher on a real
directory with the real reactor; plus Clock-driven unit tests for polling and
fake-kqueue unit tests for the kqueue logic (which cannot run on Linux)."""

import os
import select
import types

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.accounts import watch

#: how long "nothing happens" is watched for, seconds
QUIET = 0.25
#: how long a change may take to be noticed before the test fails
TIMEOUT = 5.0
POLL_INTERVAL = 0.02


def _reactor():
    from twisted.internet import reactor

    return reactor


def sleep(seconds):
    return task.deferLater(_reactor(), seconds, lambda: None)


class Recorder:
    """The watcher callback: counts calls, lets a test wait for the n-th."""

    def __init__(self, fail_first=0):
        self.count = 0
        self._fail_first = fail_first
        self._waiters = []

    def __call__(self):
        self.count += 1
        for n, d in list(self._waiters):
            if self.count >= n:
                self._waiters.remove((n, d))
                d.callback(self.count)
        if self._fail_first:
            self._fail_first -= 1
            raise RuntimeError("callback failure (test)")

    def wait_for(self, n, timeout=TIMEOUT):
        """A Deferred that fires once the callback has run ``n`` times."""
        if self.count >= n:
            return defer.succeed(self.count)
        d = defer.Deferred()
        self._waiters.append((n, d))
        return d.addTimeout(timeout, _reactor())


def write(path, data):
    with open(path, "w") as f:
        f.write(data)


def replace(path, data):
    tmp = path + ".tmp"
    write(tmp, data)
    os.replace(tmp, path)


class WatcherContract:
    """What every watcher must do.  Subclasses define ``make_watcher``."""

    def make_watcher(self, reactor, path, callback):
        raise NotImplementedError

    @pytest.fixture
    def setup(self, tmp_path):
        path = str(tmp_path / "accounts.json")
        write(path, '{"accounts": []}')
        calls = Recorder()
        watcher = self.make_watcher(_reactor(), path, calls)
        watcher.start()
        yield path, calls, watcher
        watcher.stop()

    @pytest_twisted.inlineCallbacks
    def test_file_replaced_by_rename_is_seen(self, setup):
        path, calls, _ = setup
        yield sleep(0.05)
        replace(path, '{"accounts": [1]}')
        yield calls.wait_for(1)
        # and the watch survives the rename: a second replace is seen too
        seen = calls.count
        yield sleep(0.05)
        replace(path, '{"accounts": [1, 2]}')
        yield calls.wait_for(seen + 1)

    @pytest_twisted.inlineCallbacks
    def test_file_rewritten_in_place_is_seen(self, setup):
        path, calls, _ = setup
        yield sleep(0.05)
        write(path, '{"accounts": [3]}')
        yield calls.wait_for(1)

    @pytest_twisted.inlineCallbacks
    def test_other_files_in_the_directory_do_not_trigger(self, setup):
        path, calls, _ = setup
        directory = os.path.dirname(path)
        other = os.path.join(directory, "other.json")
        write(other, "x")
        replace(other, "y")
        write(os.path.join(directory, "accounts.json.bak"), "z")
        os.unlink(other)
        os.mkdir(os.path.join(directory, "sub"))
        yield sleep(QUIET)
        assert calls.count == 0
        # the watch is alive: the watched file is still seen
        write(path, "changed")
        yield calls.wait_for(1)

    @pytest_twisted.inlineCallbacks
    def test_deleted_then_recreated_is_seen(self, setup):
        path, calls, _ = setup
        yield sleep(0.05)
        os.unlink(path)
        yield calls.wait_for(1)
        seen = calls.count
        yield sleep(0.05)
        write(path, '{"accounts": []}')
        yield calls.wait_for(seen + 1)

    @pytest_twisted.inlineCallbacks
    def test_stop_stops_callbacks(self, setup):
        path, calls, watcher = setup
        watcher.stop()
        write(path, "after stop")
        replace(path, "after stop, renamed")
        yield sleep(QUIET)
        assert calls.count == 0
        watcher.stop()  # idempotent

    @pytest_twisted.inlineCallbacks
    def test_callback_exception_does_not_stop_the_watch(self, tmp_path):
        path = str(tmp_path / "accounts.json")
        write(path, "a")
        calls = Recorder(fail_first=1)
        watcher = self.make_watcher(_reactor(), path, calls)
        watcher.start()
        try:
            yield sleep(0.05)
            write(path, "b")
            yield calls.wait_for(1)
            yield sleep(0.05)
            replace(path, "c")
            yield calls.wait_for(2)
        finally:
            watcher.stop()


@pytest.mark.skipif(not watch.inotify_available(), reason="inotify needs Linux")
class TestInotifyWatcher(WatcherContract):
    def make_watcher(self, reactor, path, callback):
        return watch.InotifyWatcher(reactor, path, callback,
                                    fallback_interval=POLL_INTERVAL)

    @pytest_twisted.inlineCallbacks
    def test_directory_deleted_falls_back_to_polling(self, tmp_path):
        directory = tmp_path / "conf"
        directory.mkdir()
        path = str(directory / "accounts.json")
        write(path, "a")
        calls = Recorder()
        watcher = self.make_watcher(_reactor(), path, calls)
        watcher.start()
        try:
            os.unlink(path)
            os.rmdir(directory)
            yield calls.wait_for(1)
            seen = calls.count
            directory.mkdir()
            write(path, "b")
            yield calls.wait_for(seen + 1)
        finally:
            watcher.stop()

    def test_missing_directory_cannot_start(self, tmp_path):
        watcher = self.make_watcher(_reactor(), str(tmp_path / "no" / "a.json"),
                                    Recorder())
        with pytest.raises(Exception):
            watcher.start()
        assert not watcher.running


class TestPollingWatcher(WatcherContract):
    def make_watcher(self, reactor, path, callback):
        return watch.PollingWatcher(reactor, path, callback, interval=POLL_INTERVAL)


@pytest.mark.skipif(not watch.kqueue_available(),
                    reason="select.kqueue is not available (BSD/macOS only)")
class TestKqueueWatcher(WatcherContract):
    def make_watcher(self, reactor, path, callback):
        return watch.KqueueWatcher(reactor, path, callback)


class TestMakeWatcherWithRealReactor(WatcherContract):
    """Whatever make_watcher picks on this platform obeys the contract."""

    def make_watcher(self, reactor, path, callback):
        return watch.make_watcher(reactor, path, callback, interval=POLL_INTERVAL)


# ---------------------------------------------------------------------------
# Clock-driven polling


class PollingWatcherClockTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "accounts.json")
        write(self.path, "one")
        self.clock = task.Clock()
        self.calls = Recorder()
        self.watcher = watch.PollingWatcher(self.clock, self.path, self.calls, 1.0)
        self.watcher.start()
        self.addCleanup(self.watcher.stop)

    def test_no_callback_on_start_or_without_change(self):
        self.clock.advance(0)
        self.clock.pump([1.0] * 5)
        self.assertEqual(self.calls.count, 0)

    def test_change_is_seen_at_the_next_poll(self):
        replace(self.path, "two, longer")
        self.clock.advance(0.5)
        self.assertEqual(self.calls.count, 0)
        self.clock.advance(0.5)
        self.assertEqual(self.calls.count, 1)
        self.clock.advance(1.0)
        self.assertEqual(self.calls.count, 1)

    def test_same_size_rewrite_with_new_mtime_is_seen(self):
        st = os.stat(self.path)
        write(self.path, "owt")
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        self.clock.advance(1.0)
        self.assertEqual(self.calls.count, 1)

    def test_callback_exception_keeps_polling(self):
        self.calls._fail_first = 1
        write(self.path, "two, longer")
        self.clock.advance(1.0)
        self.assertEqual(self.calls.count, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.watcher.running)
        write(self.path, "three, even longer")
        self.clock.advance(1.0)
        self.assertEqual(self.calls.count, 2)

    def test_missing_and_back_each_seen_once(self):
        os.unlink(self.path)
        self.clock.pump([1.0, 1.0])
        self.assertEqual(self.calls.count, 1)
        write(self.path, "back")
        self.clock.pump([1.0, 1.0])
        self.assertEqual(self.calls.count, 2)

    def test_stop_cancels_the_timer(self):
        self.watcher.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        write(self.path, "changed after stop")
        self.clock.advance(5)
        self.assertEqual(self.calls.count, 0)

    def test_interval_must_be_positive(self):
        self.assertRaises(ValueError, watch.PollingWatcher, self.clock, self.path,
                          self.calls, 0)


class MakeWatcherTests(SynchronousTestCase):
    def test_poll_mode_forces_polling(self):
        w = watch.make_watcher(task.Clock(), "/x/accounts.json", lambda: None,
                               mode="poll", interval=3)
        self.assertIsInstance(w, watch.PollingWatcher)
        self.assertEqual((w.kind, w.interval), ("poll", 3))

    def test_auto_mode_prefers_kernel_notification(self):
        w = watch.make_watcher(task.Clock(), "/x/accounts.json", lambda: None)
        if watch.inotify_available():
            self.assertEqual(w.kind, "inotify")
        elif watch.kqueue_available():
            self.assertEqual(w.kind, "kqueue")
        else:
            self.assertEqual(w.kind, "poll")

    def test_unknown_mode_is_refused(self):
        self.assertRaises(ValueError, watch.make_watcher, task.Clock(), "/x/a",
                          lambda: None, mode="inotify-please")

    def test_unwatchable_directory_falls_back_to_polling(self):
        if not (watch.inotify_available() or watch.kqueue_available()):
            raise self.skipTest("no kernel watcher on this platform")
        clock = task.Clock()
        w = watch.make_watcher(clock, os.path.join(self.mktemp(), "a.json"),
                               lambda: None)
        w.start()
        self.addCleanup(w.stop)
        self.assertIsInstance(w.active, watch.PollingWatcher)
        self.assertTrue(w.active.running)


# ---------------------------------------------------------------------------
# kqueue logic with a fake select module (runs everywhere)


class FakeKevent:
    def __init__(self, ident, filter=0, flags=0, fflags=0, data=0, udata=0):
        self.ident = ident
        self.filter = filter
        self.flags = flags
        self.fflags = fflags


class FakeKqueue:
    def __init__(self):
        self.registered = {}
        self.pending = []
        self.closed = False

    def fileno(self):
        return 1000

    def control(self, changelist, max_events, timeout=None):
        for ev in changelist or ():
            self.registered[ev.ident] = ev
        out, self.pending = self.pending[:max_events], self.pending[max_events:]
        return out

    def close(self):
        self.closed = True


def fake_select():
    kq = FakeKqueue()
    module = types.SimpleNamespace(
        kqueue=lambda: kq,
        kevent=FakeKevent,
        KQ_FILTER_VNODE=-4,
        KQ_EV_ADD=0x1,
        KQ_EV_CLEAR=0x20,
        KQ_NOTE_DELETE=0x1,
        KQ_NOTE_WRITE=0x2,
        KQ_NOTE_EXTEND=0x4,
        KQ_NOTE_ATTRIB=0x8,
        KQ_NOTE_RENAME=0x20,
    )
    return module, kq


class KqueueLogicTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "accounts.json")
        write(self.path, "one")
        self.reactor = MemoryReactorClock()
        self.select, self.kq = fake_select()
        self.calls = Recorder()
        self.watcher = watch.KqueueWatcher(self.reactor, self.path, self.calls,
                                           select_module=self.select)
        self.watcher.start()
        self.addCleanup(self.watcher.stop)
        [self.reader] = self.reactor.getReaders()

    def event(self, fd, fflags):
        self.kq.pending.append(FakeKevent(fd, self.select.KQ_FILTER_VNODE,
                                          fflags=fflags))
        self.reader.doRead()

    def file_inode(self):
        return os.fstat(self.watcher._file_fd).st_ino

    def test_registers_directory_and_file_with_the_reactor(self):
        s = self.select
        self.assertEqual(self.reader.fileno(), self.kq.fileno())
        dir_ev = self.kq.registered[self.watcher._dir_fd]
        self.assertTrue(dir_ev.fflags & s.KQ_NOTE_WRITE)
        file_ev = self.kq.registered[self.watcher._file_fd]
        for note in ("WRITE", "DELETE", "RENAME", "EXTEND", "ATTRIB"):
            self.assertTrue(file_ev.fflags & getattr(s, "KQ_NOTE_" + note), note)
        self.assertEqual(file_ev.filter, s.KQ_FILTER_VNODE)

    def test_in_place_write_calls_back(self):
        write(self.path, "two")
        self.event(self.watcher._file_fd, self.select.KQ_NOTE_WRITE)
        self.assertEqual(self.calls.count, 1)

    def test_rename_over_reopens_the_file_watch(self):
        old_fd, old_inode = self.watcher._file_fd, self.file_inode()
        replace(self.path, "two")
        self.event(old_fd, self.select.KQ_NOTE_DELETE)
        self.event(self.watcher._dir_fd, self.select.KQ_NOTE_WRITE)
        self.assertGreaterEqual(self.calls.count, 1)
        self.assertEqual(self.file_inode(), os.stat(self.path).st_ino)
        self.assertNotEqual(self.file_inode(), old_inode)
        self.assertIn(self.watcher._file_fd, self.kq.registered)
        # the new file is watched: an in-place write on it is seen
        seen = self.calls.count
        self.event(self.watcher._file_fd, self.select.KQ_NOTE_WRITE)
        self.assertEqual(self.calls.count, seen + 1)

    def test_directory_event_for_another_file_is_ignored(self):
        write(os.path.join(self.dir, "other.json"), "x")
        self.event(self.watcher._dir_fd, self.select.KQ_NOTE_WRITE)
        self.assertEqual(self.calls.count, 0)

    def test_deleted_then_recreated(self):
        os.unlink(self.path)
        self.event(self.watcher._file_fd, self.select.KQ_NOTE_DELETE)
        self.assertEqual(self.calls.count, 1)
        self.assertIsNone(self.watcher._file_fd)
        write(self.path, "again")
        self.event(self.watcher._dir_fd, self.select.KQ_NOTE_WRITE)
        self.assertEqual(self.calls.count, 2)
        self.assertEqual(self.file_inode(), os.stat(self.path).st_ino)

    def test_callback_exception_is_contained(self):
        self.calls._fail_first = 1
        self.event(self.watcher._file_fd, self.select.KQ_NOTE_WRITE)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.event(self.watcher._file_fd, self.select.KQ_NOTE_WRITE)
        self.assertEqual(self.calls.count, 2)

    def test_stop_removes_reader_and_closes_descriptors(self):
        dir_fd, file_fd = self.watcher._dir_fd, self.watcher._file_fd
        self.watcher.stop()
        self.assertEqual(self.reactor.getReaders(), [])
        self.assertTrue(self.kq.closed)
        for fd in (dir_fd, file_fd):
            self.assertRaises(OSError, os.fstat, fd)


class KqueueAvailableTests(SynchronousTestCase):
    if not hasattr(select, "kqueue"):
        skip = "select.kqueue is not available (BSD/macOS only)"

    def test_kqueue_available(self):
        self.assertTrue(watch.kqueue_available())
