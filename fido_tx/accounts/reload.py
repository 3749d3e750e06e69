"""The accounts set: load at start, reload on change, keep the last good set.

:class:`AccountsSource` is a twisted ``Service`` between the accounts file
and whoever runs the accounts (the scheduler's ``set_accounts``, through the
``apply`` callable the composition root passes in)::

    watcher event -> debounce -> load -> shard filter -> diff -> apply(accounts, diff)

Rules:

* **Debounce.**  A burst of watcher events (create, write, close, rename)
  is one load, ``debounce`` seconds after the last event (but at most
  ``max_wait`` seconds after the first, so a file rewritten without pause
  is still loaded).
* **Never apply a broken file.**  A file that cannot be used as a whole
  (``accounts.AccountsFileError``: half written, bad JSON, wrong key,
  missing) is tried again after ``retry_delay`` seconds (and on every
  later event).  Still bad after that retry: the last good set stays, the
  log says exactly what is wrong (the loader's one-line message names the
  file, and where it can the line, account id and field), and
  ``report(kind="config", message=..., account=None)`` is called once per
  distinct problem: the same problem again is logged but not re-reported;
  once the file loads, the problem is forgotten (a relapse is reported).
* **A bad account is dropped alone.**  The loader leaves out entries with
  problems (``LoadResult.problems``) and the rest is applied.  Each such
  problem is logged and reported once (``account=<id>``) while it lasts.
  Problems of accounts in other shards are left to the instance that owns
  them.
* **Shards.**  Only accounts with ``accounts.in_shard(id, shard)`` are
  applied.
* **Only real changes are applied.**  An unchanged set (empty diff) logs at
  debug level and ``apply`` is not called.

Startup and the last good copy (decision)
-----------------------------------------
After every good load the *raw bytes of the accounts file*, exactly as they
were when they loaded, are saved to ``cache_path`` (atomically: a temporary
file created with mode 0600, fsync, rename).  They are the web application's
bytes: still a Fernet token when the source is encrypted, so the cache holds
nothing the source file did not, and it is decrypted with the same key file.
(A plain-JSON source gives a plain-JSON cache, mode 0600.)  The bytes are
saved only when the file's ``(mtime, size, inode, device)`` was the same
before the load and after reading the bytes, so the cache is never a copy of
a newer, unvalidated version; and only when they differ from what is cached.

At start the file is loaded once, synchronously:

* good: applied, cached, watched;
* bad, and a cached copy loads: the cached set is applied, an error is
  logged loudly and reported (``config``), the file is retried after
  ``retry_delay`` and on every change;
* bad, and no usable cached copy: :class:`AccountsStartupError`, whose
  ``str()`` is one line, is raised from :meth:`AccountsSource.load_initial`
  (also called by ``startService``): the composition root turns it into a
  one-line error and a non-zero exit.  There is no synchronous retry at
  start (no sleeping on the reactor); a supervisor restart covers a file
  caught half written at that instant.

Cost (10,000 accounts, 2 MB of JSON): the load dominates (read, Fernet
decrypt, ``json.loads`` about 15 ms, per-entry validation about 70 ms), then
the diff (about 10 ms) and the cache write (read back, SHA-256, fsync).
On the real reactor all of that runs in the reactor's thread pool
(``run_blocking``); the reactor thread itself spends a few milliseconds per
reload (bookkeeping, logging, ``apply``), and the GIL lets it in at least
every 5 ms, except during ``json.loads``, one C call of ~15 ms.  See
:attr:`AccountsSource.last_timing`.

The parts: :mod:`~fido_tx.accounts.debounce` (the one timer),
:mod:`~fido_tx.accounts.loading` (the blocking part),
:mod:`~fido_tx.accounts.lastgood` (the last good copy),
:mod:`~fido_tx.accounts.notices` (what the operator is told).  This module
is the order of things: start, events, loads, failures, applying.
"""

import os
import time

from twisted.application import service

from fido_tx import errors
from fido_tx.accounts import model as accounts_mod
from fido_tx.accounts.debounce import Debouncer
from fido_tx.accounts.lastgood import LastGoodCopy, path_signature
from fido_tx.accounts.loading import ShardLoad, pick_runner, run_inline
from fido_tx.accounts.notices import AccountsNotices

__all__ = ["AccountsSource", "AccountsStartupError", "run_inline"]


class AccountsStartupError(errors.OneLineError):
    """The accounts file cannot be used at start and no cached copy can.
    ``str()`` is one line for the operator."""


class AccountsSource(service.Service):
    """Keeps ``apply`` fed with the current, good, shard-filtered accounts.

    :param clock: ``IReactorTime`` for debounce and retry timers.
    :param path: the accounts file.
    :param key_file: Fernet key file, ``""`` for plain JSON.
    :param apply: ``apply(accounts: tuple[Account], diff: AccountsDiff)``,
        called with every new set (first with everything in ``diff.added``),
        always on the reactor thread.
    :param watcher_factory: ``f(path, callback) -> watcher`` with
        ``start()``/``stop()``; used for the accounts file and the key file.
    :param loader: ``loader(path, key_file, base_dir=None) -> LoadResult``,
        raising ``accounts.AccountsFileError``; default
        ``accounts.load_accounts``.
    :param report: ``report(kind=..., message=..., account=...)`` or None.
    :param cache_path: where the last good bytes are kept; None: no cache.
    :param shard: ``"k/n"``.
    :param max_wait: longest a burst of events may delay a load, seconds.
    :param run_blocking: ``run_blocking(f, *args) -> Deferred`` runs the
        blocking part of a reload (read, decrypt, parse, validate, shard
        filter, diff, cache write).  ``None``: the reactor's thread pool
        when ``clock`` provides ``IReactorThreads`` (the real reactor), so a
        reload of thousands of accounts does not stall the reactor; else
        inline (a ``task.Clock`` in tests).  :func:`run_inline` forces inline.
        The load at start is always inline (the reactor is not serving yet).
        ``apply``, logging and reporting always run on the reactor thread.
    """

    name = "accounts"

    def __init__(
        self,
        clock,
        path,
        key_file,
        apply,
        watcher_factory,
        loader=None,
        debounce=0.2,
        retry_delay=1.0,
        report=None,
        cache_path=None,
        shard="1/1",
        max_wait=5.0,
        run_blocking=None,
    ):
        self.path = os.path.abspath(path)
        self.key_file = key_file
        self._apply = apply
        self._watcher_factory = watcher_factory
        self._retry_delay = retry_delay
        self._last_good = LastGoodCopy(cache_path, self.path)
        self.cache_path = self._last_good.path
        self._load = ShardLoad(loader, key_file, shard, self._last_good)
        self.shard = shard
        self._notices = AccountsNotices(self.path, self.cache_path, key_file, report,
                                        self._load.mine)
        self._timer = Debouncer(clock, self._load_now, debounce, max_wait)
        self._run_blocking = run_blocking if run_blocking is not None else pick_runner(clock)

        #: the set last applied (shard-filtered), in file order
        self.accounts = ()
        #: True while running on the cached copy because the file is bad
        self.using_cache = False
        #: the current whole-file problem (one line) or None
        self.problem = None
        #: seconds spent on the last load: load, diff (with the shard filter),
        #: cache, blocking (all three), apply, reactor (time the reactor thread
        #: was busy with the reload: everything when inline, else apply)
        self.last_timing = {}
        self.loaded = False

        self._watchers = []
        self._loading = False
        self._dirty = False
        self._failures = 0
        self._initial_signature = None

    @property
    def log(self):
        """The logger of every line about the accounts file (tests swap it)."""
        return self._notices.log

    @log.setter
    def log(self, logger):
        self._notices.log = logger

    # -- service

    def startService(self):
        if not self.loaded:
            self.load_initial()
        super().startService()
        self._start_watchers()
        if not self._timer.waiting and path_signature(self.path) != self._initial_signature:
            # Changed between load_initial() and the watch starting.
            self._changed()

    def stopService(self):
        super().stopService()
        self._timer.cancel()
        watchers, self._watchers = self._watchers, []
        for w in watchers:
            try:
                w.stop()
            except Exception:
                self.log.failure("stopping the watch on {path} failed", path=self.path)

    def _start_watchers(self):
        paths = [self.path]
        if self.key_file:
            # The key may be rotated after the file that needs it was written:
            # a change of the key file is a reason to load again too.
            paths.append(os.path.abspath(self.key_file))
        for p in paths:
            watcher = self._watcher_factory(p, self._changed)
            watcher.start()
            self._watchers.append(watcher)

    # -- start

    def load_initial(self):
        """Load the file once, synchronously, and apply it (or the cached
        copy).  Raises :class:`AccountsStartupError` when neither is usable."""
        self._last_good.read_digest()
        try:
            loaded = self._load.compute(self.path, self.accounts)
        except accounts_mod.AccountsFileError as e:
            if not os.path.exists(self.path) and not self._last_good.exists():
                # A first start (zero-config): the web application has not
                # written the file yet.  Run with no accounts; the watch on
                # the directory picks the file up when it appears.
                self._notices.missing_at_start()
                self.loaded = True
                self._initial_signature = None
                return
            self._start_from_cache(str(e))
            return
        except Exception as e:
            self.log.failure("loading {path} failed unexpectedly", path=self.path)
            self._start_from_cache(f"{self.path}: cannot load accounts file: {e}")
            return
        self._initial_signature = loaded.signature
        self._use(loaded, initial=True)

    def _start_from_cache(self, problem):
        if not self._last_good.exists():
            raise AccountsStartupError(
                f"{problem} (and no last good copy to fall back on)")
        try:
            loaded = self._load.compute(self.cache_path, self.accounts,
                                        base_dir=os.path.dirname(self.path))
        except Exception as e:
            raise AccountsStartupError(
                f"{problem}; the last good copy {self.cache_path} is unusable too: {e}"
            ) from None
        self.using_cache = True
        self.problem = problem
        self._notices.unusable_at_start(problem, self._last_good.saved_at())
        self._use(loaded, initial=True, from_cache=True)
        # It may have been caught half written: look again soon.
        self._failures = 1
        self._timer.schedule(self._retry_delay or 0.0)

    # -- events

    def _changed(self):
        """Watcher callback: (re)start the debounce timer."""
        if not self.running:
            return
        self._failures = 0
        if self._loading:
            self._dirty = True
            return
        self._timer.event()

    def reload(self):
        """Load now (operator request, SIGHUP), without waiting for an event."""
        self._timer.cancel()
        self._failures = 0
        self._load_now()

    # -- reloading

    def _load_now(self):
        if self._loading:
            self._dirty = True
            return
        self._loading = True
        self._dirty = False
        started = time.perf_counter()
        d = self._run_blocking(self._load.compute, self.path, self.accounts)
        d.addCallbacks(self._reloaded, self._reload_failed, callbackArgs=(started,))
        d.addErrback(lambda f: self.log.failure(
            "reloading {path} failed unexpectedly", f, path=self.path))
        d.addBoth(self._load_done)

    def _reloaded(self, loaded, started):
        self._loading = False
        if not self.running:
            return
        self._use(loaded, dispatched=started)

    def _reload_failed(self, failure):
        self._loading = False
        if not self.running:
            return
        if failure.check(accounts_mod.AccountsFileError):
            self._failed(str(failure.value))
            return
        self.log.failure("loading {path} failed unexpectedly", failure, path=self.path)
        self._failed(f"{self.path}: cannot load accounts file: {failure.getErrorMessage()}")

    def _load_done(self, _):
        self._loading = False
        if self._dirty and self.running:
            self._dirty = False
            self._changed()

    def _failed(self, problem):
        self._failures += 1
        if self._failures == 1 and self._retry_delay is not None:
            self._notices.retrying(self._retry_delay, problem)
            if not self._timer.waiting:
                self._timer.schedule(self._retry_delay)
            return
        self._failures = 0
        self.problem = problem
        kept = ("the last good copy" if self.using_cache else "the previous set")
        self._notices.unusable(problem, kept, len(self.accounts))

    # -- using a good load (reactor thread)

    def _use(self, loaded, initial=False, from_cache=False, dispatched=None):
        entered = time.perf_counter()
        if not from_cache:
            self._notices.usable_again(self.problem is not None, self.using_cache)
            self.problem = None
            self.using_cache = False
            self._failures = 0
        self._notices.cache(loaded)
        self._notices.account_problems(loaded.result.problems, from_cache)
        if not from_cache:
            self._notices.permissions()
        new, diff = loaded.accounts, loaded.diff
        if diff.empty and not initial:
            self.accounts = new
            self._notices.unchanged(len(new))
            applied = entered
        else:
            try:
                self._apply(new, diff)
            except Exception:
                self.log.failure("applying the new accounts set failed; "
                                 "the next change is diffed against the old set")
                return
            applied = time.perf_counter()
            self.accounts = new
            self._notices.applied(initial, from_cache, diff, len(new),
                                  loaded.timing["blocking"] + (applied - entered))
        self.loaded = True
        self.last_timing = self._timing(loaded, entered, applied, dispatched)

    def _timing(self, loaded, entered, applied, dispatched):
        timing = dict(loaded.timing)
        timing["apply"] = applied - entered
        inline = dispatched is None or self._run_blocking is run_inline
        timing["reactor"] = (timing["blocking"] if inline else 0.0) + (
            time.perf_counter() - entered)
        if dispatched is not None:
            timing["wall"] = time.perf_counter() - dispatched
        return timing
