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
"""

import hashlib
import os
import time

import attr
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from fido_tx.accounts import model as accounts_mod
from fido_tx import boundedfile, errors

__all__ = ["AccountsSource", "AccountsStartupError", "run_inline"]

CONFIG = "config"


class AccountsStartupError(errors.OneLineError):
    """The accounts file cannot be used at start and no cached copy can.
    ``str()`` is one line for the operator."""


def _stat_signature(st):
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _path_signature(path):
    try:
        return _stat_signature(os.stat(path))
    except OSError:
        return None


def _ms(seconds):
    return round(seconds * 1000.0, 1)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Loaded:
    """What the blocking part of a load computed."""

    result: object  # LoadResult
    accounts: tuple  # shard-filtered
    diff: object  # AccountsDiff against the set current when the load began
    timing: dict
    cache_warning: str | None = None  # why the bytes could not be cached
    cache_saved: bool = False  # the bytes are in the cache now
    signature: tuple | None = None  # the file's stat signature before loading


def run_inline(f, *args):
    """A ``run_blocking`` that runs ``f`` here and now (on the reactor thread)."""
    return defer.maybeDeferred(f, *args)


def _thread_runner(reactor):
    """A ``run_blocking`` on ``reactor``'s thread pool (created lazily)."""

    def run(f, *args):
        from twisted.internet import threads

        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


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
    log = Logger()

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
        self._clock = clock
        self.path = os.path.abspath(path)
        self.key_file = key_file
        self._apply = apply
        self._watcher_factory = watcher_factory
        self._loader = loader
        self._debounce = debounce
        self._retry_delay = retry_delay
        self._max_wait = max(max_wait, debounce)
        self._report = report
        self.cache_path = os.path.abspath(cache_path) if cache_path else None
        self.shard = shard
        accounts_mod.in_shard("x", shard)  # ValueError now, not at first load
        self._all_mine = shard.strip() == "1/1"
        if run_blocking is None:
            from twisted.internet.interfaces import IReactorThreads

            if IReactorThreads.providedBy(clock):
                run_blocking = _thread_runner(clock)
            else:
                run_blocking = run_inline
        self._run_blocking = run_blocking

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
        self._pending = None
        self._burst_started = None
        self._loading = False
        self._dirty = False
        self._failures = 0
        self._reported_file_problem = None
        self._reported_account_problems = frozenset()
        # Touched by the blocking part only (one load at a time).
        self._shard_memo = {}
        self._cache_sig = None
        self._cache_digest = None
        self._cache_warned = None
        self._permissions_warned = None
        self._initial_signature = None

    # -- service

    def startService(self):
        if not self.loaded:
            self.load_initial()
        super().startService()
        self._start_watchers()
        if self._pending is None and _path_signature(self.path) != self._initial_signature:
            # Changed between load_initial() and the watch starting.
            self._changed()

    def stopService(self):
        super().stopService()
        self._cancel_pending()
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
        self._read_cache_digest()
        try:
            loaded = self._compute(self.path, self.accounts)
        except accounts_mod.AccountsFileError as e:
            if not os.path.exists(self.path) and not (
                self.cache_path and os.path.exists(self.cache_path)
            ):
                # A first start (zero-config): the web application has not
                # written the file yet.  Run with no accounts; the watch on
                # the directory picks the file up when it appears.
                self.log.warn(
                    "accounts file {path} does not exist yet: running with no "
                    "accounts until the web application writes it",
                    path=self.path,
                )
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
        if not self.cache_path or not os.path.exists(self.cache_path):
            raise AccountsStartupError(
                f"{problem} (and no last good copy to fall back on)")
        try:
            loaded = self._compute(self.cache_path, self.accounts,
                                   base_dir=os.path.dirname(self.path))
        except Exception as e:
            raise AccountsStartupError(
                f"{problem}; the last good copy {self.cache_path} is unusable too: {e}"
            ) from None
        try:
            saved = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                  time.gmtime(os.stat(self.cache_path).st_mtime))
        except OSError:
            saved = "unknown time"
        self.using_cache = True
        self.problem = problem
        self._reported_file_problem = problem
        message = (f"{problem}; running with the last good copy of the accounts "
                   f"from {saved} ({self.cache_path}) until the file is fixed")
        self.log.error("ACCOUNTS FILE UNUSABLE AT START: {message}", message=message)
        self._send_report(message, None)
        self._use(loaded, initial=True, from_cache=True)
        # It may have been caught half written: look again soon.
        self._failures = 1
        self._schedule(self._retry_delay or 0.0)

    # -- events and timers

    def _changed(self):
        """Watcher callback: (re)start the debounce timer."""
        if not self.running:
            return
        self._failures = 0
        if self._loading:
            self._dirty = True
            return
        now = self._clock.seconds()
        if self._pending is not None and self._pending.active():
            # A burst goes on (or a retry was waiting): push the load back,
            # but not past max_wait after the burst's first event.
            if self._burst_started is None:
                self._burst_started = now
            deadline = self._burst_started + self._max_wait
            self._pending.reset(max(0.0, min(self._debounce, deadline - now)))
            return
        self._schedule(self._debounce)
        self._burst_started = now

    def reload(self):
        """Load now (operator request, SIGHUP), without waiting for an event."""
        self._cancel_pending()
        self._failures = 0
        self._load_now()

    def _schedule(self, delay):
        self._cancel_pending()
        self._pending = self._clock.callLater(delay, self._timer)

    def _cancel_pending(self):
        pending, self._pending = self._pending, None
        self._burst_started = None
        if pending is not None and pending.active():
            pending.cancel()

    def _timer(self):
        self._pending = None
        self._burst_started = None
        self._load_now()

    # -- reloading

    def _load_now(self):
        if self._loading:
            self._dirty = True
            return
        self._loading = True
        self._dirty = False
        started = time.perf_counter()
        d = self._run_blocking(self._compute, self.path, self.accounts)
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
            self.log.info(
                "accounts file unusable, trying again in {delay} s "
                "(it may be half written): {problem}",
                delay=self._retry_delay, problem=problem,
            )
            if self._pending is None:
                self._schedule(self._retry_delay)
            return
        self._failures = 0
        self.problem = problem
        kept = ("the last good copy" if self.using_cache else "the previous set")
        if problem != self._reported_file_problem:
            self._reported_file_problem = problem
            self.log.error(
                "accounts file not applied, keeping {kept} ({count} accounts): {problem}",
                kept=kept, count=len(self.accounts), problem=problem,
            )
            self._send_report(
                f"{problem}; keeping {kept} of {len(self.accounts)} accounts", None)
        else:
            self.log.warn(
                "accounts file still unusable, keeping {kept} ({count} accounts): "
                "{problem}", kept=kept, count=len(self.accounts), problem=problem,
            )

    # -- the blocking part (may run in a worker thread)

    def _load(self, path, base_dir=None):
        loader = self._loader
        if loader is None:
            loader = accounts_mod.load_accounts
        if base_dir is None:
            return loader(path, self.key_file)
        return loader(path, self.key_file, base_dir=base_dir)

    def _compute(self, path, old, base_dir=None):
        """Load ``path``, filter by shard, diff against ``old``, cache the
        bytes.  Touches no state the reactor thread uses but the shard memo
        and cache bookkeeping, which only this (one at a time) uses."""
        started = time.perf_counter()
        from_cache = base_dir is not None
        sig = None if from_cache else _path_signature(path)
        result = self._load(path, base_dir)
        loaded = time.perf_counter()
        if self._all_mine:
            new = tuple(result.accounts)
        else:
            memo = self._shard_memo
            shard = self.shard
            mine = {}
            for a in result.accounts:
                m = memo.get(a.id)
                if m is None:
                    m = accounts_mod.in_shard(a.id, shard)
                mine[a.id] = m
            self._shard_memo = mine
            new = tuple(a for a in result.accounts if mine[a.id])
        diff = accounts_mod.diff_accounts(old, new)
        diffed = time.perf_counter()
        warning = None if from_cache else self._save_cache(sig)
        saved = warning is None and sig is not None and sig == self._cache_sig
        done = time.perf_counter()
        timing = {
            "load": loaded - started,
            "diff": diffed - loaded,
            "cache": done - diffed,
            "blocking": done - started,
        }
        return _Loaded(result, new, diff, timing, warning, saved, sig)

    def _mine(self, account_id):
        if self._all_mine:
            return True
        m = self._shard_memo.get(account_id)
        if m is None:
            m = accounts_mod.in_shard(account_id, self.shard)
        return m

    # -- using a good load (reactor thread)

    def _check_permissions(self):
        """Warn once per file and mode when the key file, or a plain accounts
        file (it holds passwords in clear), can be read by group or others."""
        secret = self.key_file if self.key_file else self.path
        what = "key file" if self.key_file else "plain accounts file (passwords in clear)"
        try:
            mode = os.stat(secret).st_mode & 0o777
        except OSError:
            return
        if not accounts_mod.insecure_permissions(secret):
            self._permissions_warned = None
            return
        if self._permissions_warned == (secret, mode):
            return
        self._permissions_warned = (secret, mode)
        self.log.warn(
            "the {what} {path} can be read by group or others (mode {mode:o}): "
            "chmod 600 it{hint}",
            what=what, path=secret, mode=mode,
            hint="" if self.key_file else ", or encrypt it (fido keygen, fido encrypt)",
        )

    def _use(self, loaded, initial=False, from_cache=False, dispatched=None):
        entered = time.perf_counter()
        if not from_cache:
            if self.problem is not None:
                self.log.info("accounts file {path} is usable again", path=self.path)
            if self.using_cache:
                self.log.info("no longer running on the last good copy of the accounts")
            self.problem = None
            self.using_cache = False
            self._reported_file_problem = None
            self._failures = 0
        if loaded.cache_saved and self._cache_warned is not None:
            self.log.info("the last good copy of the accounts is saved to {cache} again",
                          cache=self.cache_path)
            self._cache_warned = None
        elif loaded.cache_warning is not None and loaded.cache_warning != self._cache_warned:
            self._cache_warned = loaded.cache_warning
            self.log.warn(
                "cannot save the last good copy of the accounts to {cache}: "
                "{error}; a bad accounts file at the next start will stop Fido",
                cache=self.cache_path, error=loaded.cache_warning,
            )
        self._account_problems(loaded.result.problems, from_cache)
        if not from_cache:
            self._check_permissions()
        new, diff = loaded.accounts, loaded.diff
        if diff.empty and not initial:
            self.accounts = new
            self.log.debug("accounts file {path} reloaded: no change ({total} accounts)",
                           path=self.path, total=len(new))
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
            self.log.info(
                "accounts {verb} from {path}: {added} added, {removed} removed, "
                "{changed} changed, {total} total in {ms} ms",
                verb="loaded" if initial else "reloaded",
                path=self.cache_path if from_cache else self.path,
                added=len(diff.added), removed=len(diff.removed),
                changed=len(diff.changed), total=len(new),
                ms=_ms(loaded.timing["blocking"] + (applied - entered)),
            )
        self.loaded = True
        timing = dict(loaded.timing)
        timing["apply"] = applied - entered
        inline = dispatched is None or self._run_blocking is run_inline
        timing["reactor"] = (timing["blocking"] if inline else 0.0) + (
            time.perf_counter() - entered)
        if dispatched is not None:
            timing["wall"] = time.perf_counter() - dispatched
        self.last_timing = timing

    def _account_problems(self, problems, from_cache):
        source = self.cache_path if from_cache else self.path
        mine = [p for p in problems
                if p.account_id is None or self._mine(p.account_id)]
        keys = {}
        for p in mine:
            keys.setdefault(str(p), p)
        for key, p in keys.items():
            if key in self._reported_account_problems:
                continue
            self.log.error(
                "accounts file {path}: {problem}; this account is left out "
                "until it is fixed", path=source, problem=key,
                account_id=p.account_id, field=p.field,
            )
            self._send_report(f"{source}: {key}; this account is left out", p.account_id)
        self._reported_account_problems = frozenset(keys)

    def _send_report(self, message, account):
        if self._report is None:
            return
        try:
            self._report(kind=CONFIG, message=message, account=account)
        except Exception:
            self.log.failure("reporting an accounts problem failed")

    # -- last good copy (blocking part)

    def _read_cache_digest(self):
        if not self.cache_path:
            return
        try:
            with open(self.cache_path, "rb") as f:
                self._cache_digest = hashlib.sha256(f.read()).digest()
        except OSError:
            self._cache_digest = None

    def _save_cache(self, sig):
        """Save the file's bytes if they are the ones just loaded (same
        signature before the load and at this read) and new.  Returns a
        warning (one line) when they cannot be saved, else None."""
        if not self.cache_path or sig is None or sig == self._cache_sig:
            return None
        try:
            # the same bounds as the load (a regular file, a size limit)
            data = boundedfile.read_regular(self.path, boundedfile.MAX_ACCOUNTS_BYTES,
                                            "accounts file")
            now = _stat_signature(os.stat(self.path))
        except OSError:
            return None
        if now != sig:
            # Changed while loading: an event for the newer version follows.
            return None
        digest = hashlib.sha256(data).digest()
        if digest != self._cache_digest:
            try:
                _write_atomically(self.cache_path, data)
            except OSError as e:
                return f"{type(e).__name__}: {e}"
            self._cache_digest = digest
        self._cache_sig = sig
        return None


def _write_atomically(path, data):
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
