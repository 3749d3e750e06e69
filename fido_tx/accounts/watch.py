"""Watch one file (the accounts file) and call back when it may have changed.

Three watchers with one interface, ``start()`` and ``stop()``; each calls
``callback()`` (no arguments) when the watched file may have changed.  A call
is a hint, not a promise: callers re-read the file, debounce bursts and cope
with a file that is half written, missing, or unchanged.

- :class:`InotifyWatcher` (Linux): watches the file's *directory* with
  ``twisted.internet.inotify`` and keeps only events whose name is the file's
  basename.  A watch on the file itself would die with the first atomic
  ``rename(tmp, file)`` the web application makes.
- :class:`KqueueWatcher` (BSD, macOS): ``select.kqueue`` with ``EVFILT_VNODE``
  on the directory (entries added, removed, renamed) and on the file (content,
  size, attributes, delete, rename); the file watch is reopened whenever the
  name points at a new inode.
- :class:`PollingWatcher`: ``os.stat`` every ``interval`` seconds, comparing
  ``(st_mtime_ns, st_size, st_ino, st_dev)``.  For network file systems (NFS,
  SMB, FUSE), where kernel notifications do not see other machines' writes,
  and for ``watch = "poll"``.

:func:`make_watcher` picks one by platform and the ``watch`` setting.

Robustness rules (see DESIGN.md, "Known facts"): an exception raised from an
inotify callback stops the whole notifier, and a ``LoopingCall`` whose
function raises stops for good, so every call into user code is guarded and
logged here.
"""

import errno
import os
import sys

from twisted.internet import task
from twisted.logger import Logger
from twisted.python import filepath

log = Logger()

__all__ = [
    "InotifyWatcher",
    "KqueueWatcher",
    "PollingWatcher",
    "make_watcher",
    "inotify_available",
    "kqueue_available",
]


def _safe_call(callback, path, watcher):
    """Call ``callback()``; log (never raise) whatever it raises."""
    try:
        callback()
    except Exception:
        log.failure(
            "file watch callback for {path} raised; the watch goes on",
            path=path,
            watcher=watcher,
        )


def _split(path):
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    return path, directory, name


# ---------------------------------------------------------------------------
# inotify


def inotify_available():
    """True when ``twisted.internet.inotify`` works on this system."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        from twisted.python import _inotify

        fd = _inotify.init()
    except Exception:
        return False
    os.close(fd)
    return True


class InotifyWatcher:
    """Watch ``path`` through an inotify watch on its directory.

    Events kept (for the file's basename only):

    - ``IN_CLOSE_WRITE``: a writer that opened the file for writing closed it,
      the end of an in-place rewrite (``open("w")``, ``write``, ``close``).
      Chosen over ``IN_MODIFY``, which fires on every partial ``write()``.
    - ``IN_MOVED_TO``: a file was renamed onto the name (atomic replace).
    - ``IN_MOVED_FROM`` / ``IN_DELETE``: the file went away (the caller keeps
      its last good copy; a later create or rename brings the next event).
    - ``IN_CREATE``: a new file under the name (also a ``link()``); usually
      followed by ``IN_CLOSE_WRITE``, which the caller's debounce absorbs.
    - ``IN_ATTRIB``: ``touch`` to force a reload, as with polling (mtime).

    A writer that keeps the file open and writes it in place without closing
    gives no event until it closes; that is no common way to write a config
    file, and the file would be half written anyway.

    Each watcher owns its own ``INotify`` descriptor: Twisted drops the whole
    notifier when a watched directory is deleted (``IN_DELETE_SELF``), and
    that must not take other watches with it.  When the directory itself is
    deleted or renamed (``IN_DELETE_SELF``, ``IN_MOVE_SELF``) the inotify
    watch no longer follows the path, so this watcher falls back to stat
    polling of the path (``fallback_interval`` seconds) and says so in the log.

    Known limit: Twisted's ``INotify`` drops ``IN_Q_OVERFLOW`` (queue
    overflow) events.  One directory with a handful of files will not
    overflow the kernel queue (16384 events by default).
    """

    def __init__(self, reactor, path, callback, fallback_interval=1.0):
        from twisted.internet import inotify

        self._inotify = inotify
        self._reactor = reactor
        self.path, self._dir, name = _split(path)
        self._name = os.fsencode(name)
        self._callback = callback
        self._fallback_interval = fallback_interval
        self._notifier = None
        self._fallback = None
        self.running = False
        self.mask = (
            inotify.IN_CLOSE_WRITE
            | inotify.IN_MOVED_TO
            | inotify.IN_MOVED_FROM
            | inotify.IN_CREATE
            | inotify.IN_DELETE
            | inotify.IN_ATTRIB
            | inotify.IN_DELETE_SELF
            | inotify.IN_MOVE_SELF
            | inotify.IN_ONLYDIR
        )

    def start(self):
        """Start watching.  Raises ``OSError``/``INotifyError`` when the
        directory cannot be watched (missing, not a directory, out of
        watches): the caller decides whether to fall back to polling."""
        if self.running:
            return
        notifier = self._inotify.INotify(reactor=self._reactor)
        try:
            notifier.watch(
                filepath.FilePath(os.fsencode(self._dir)),
                mask=self.mask,
                callbacks=[self._event],
            )
        except BaseException:
            notifier.loseConnection()
            raise
        notifier.startReading()
        self._notifier = notifier
        self.running = True
        log.debug("inotify watch on {directory} for {name}",
                  directory=self._dir, name=os.fsdecode(self._name))

    def stop(self):
        """Stop watching; no callback is made after this returns."""
        self.running = False
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.loseConnection()
        fallback, self._fallback = self._fallback, None
        if fallback is not None:
            fallback.stop()

    def _event(self, _watch, path, mask):
        # Runs inside INotify.doRead: must never raise.
        try:
            if not self.running:
                return
            inotify = self._inotify
            if mask & (inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF):
                self._directory_gone(mask)
                return
            if path.basename() != self._name:
                return
            if mask & inotify.IN_ISDIR:
                return
            log.debug("inotify {events} on {path}",
                      events=",".join(inotify.humanReadableMask(mask)),
                      path=self.path)
            _safe_call(self._callback, self.path, self)
        except Exception:
            log.failure("inotify event handling for {path} failed", path=self.path)

    def _directory_gone(self, mask):
        log.warn(
            "the directory {directory} of {path} was deleted or renamed; "
            "watching it by stat polling every {interval}s from now on",
            directory=self._dir,
            path=self.path,
            interval=self._fallback_interval,
        )
        notifier, self._notifier = self._notifier, None
        if notifier is not None and mask & self._inotify.IN_MOVE_SELF:
            # On IN_DELETE_SELF Twisted closes the notifier itself.
            self._reactor.callLater(0, notifier.loseConnection)
        self._fallback = PollingWatcher(
            self._reactor, self.path, self._callback, self._fallback_interval
        )
        self._fallback.start()
        _safe_call(self._callback, self.path, self)


# ---------------------------------------------------------------------------
# kqueue


def kqueue_available(select_module=None):
    """True when ``select.kqueue`` exists (BSD, macOS)."""
    if select_module is None:
        import select as select_module
    return hasattr(select_module, "kqueue")


class _KqueueDescriptor:
    """The kqueue descriptor as an ``IReadDescriptor`` for ``addReader``."""

    def __init__(self, watcher, kq):
        self._watcher = watcher
        self._kq = kq

    def fileno(self):
        return self._kq.fileno()

    def doRead(self):
        self._watcher._readable()

    def connectionLost(self, reason):
        self._watcher._lost(reason)

    def logPrefix(self):
        return "KqueueWatcher"


def _implements_read_descriptor():
    from zope.interface import classImplements
    from twisted.internet.interfaces import IReadDescriptor

    classImplements(_KqueueDescriptor, IReadDescriptor)


_implements_read_descriptor()


class KqueueWatcher:
    """Watch ``path`` with BSD/macOS kqueue ``EVFILT_VNODE`` filters.

    - The directory's descriptor with ``NOTE_WRITE``: an entry was added,
      removed or renamed in the directory (create, delete, atomic rename).
      That fires for any file in the directory, so the callback is made only
      when the name now points at a different inode than the one watched (or
      appeared, or disappeared).
    - The file's descriptor with ``NOTE_WRITE | NOTE_EXTEND | NOTE_ATTRIB |
      NOTE_DELETE | NOTE_RENAME``: an in-place rewrite, ``touch``, or the
      file going away.  After ``NOTE_DELETE``/``NOTE_RENAME`` (and after any
      directory change that moved the name to a new inode) the file watch is
      reopened on whatever the name points at now.

    Descriptors are opened with ``O_EVTONLY`` where it exists (macOS), so the
    watch does not keep a volume busy.  The kqueue descriptor itself is
    registered with the reactor as an ``IReadDescriptor``; it is readable
    while events are pending, under any reactor (select, poll, kqueue).

    ``select_module`` is for tests: a fake with ``kqueue``, ``kevent`` and
    the constants, so the logic is tested on Linux too.
    """

    def __init__(self, reactor, path, callback, select_module=None):
        if select_module is None:
            import select as select_module
        self._select = select_module
        self._reactor = reactor
        self.path, self._dir, self._name = _split(path)
        self._callback = callback
        self._kq = None
        self._reader = None
        self._dir_fd = None
        self._file_fd = None
        self._file_id = None
        self.running = False
        # O_NONBLOCK: a FIFO in the accounts file's place must not block the reactor
        self._open_flags = os.O_RDONLY | getattr(os, "O_EVTONLY", 0) | getattr(
            os, "O_CLOEXEC", 0
        ) | getattr(os, "O_NONBLOCK", 0)

    # -- life cycle

    def start(self):
        """Start watching; raises ``OSError`` when the directory cannot be
        opened."""
        if self.running:
            return
        s = self._select
        self._kq = s.kqueue()
        try:
            self._dir_fd = os.open(self._dir, self._open_flags)
            self._control(
                self._dir_fd,
                s.KQ_EV_ADD | s.KQ_EV_CLEAR,
                s.KQ_NOTE_WRITE | s.KQ_NOTE_DELETE | s.KQ_NOTE_RENAME,
            )
            self._open_file()
        except BaseException:
            self._close_all()
            raise
        self._reader = _KqueueDescriptor(self, self._kq)
        self._reactor.addReader(self._reader)
        self.running = True
        log.debug("kqueue watch on {directory} for {name}",
                  directory=self._dir, name=self._name)

    def stop(self):
        """Stop watching; no callback is made after this returns."""
        self.running = False
        reader, self._reader = self._reader, None
        if reader is not None:
            self._reactor.removeReader(reader)
        self._close_all()

    def _close_all(self):
        self._close_file()
        for attr_name in ("_dir_fd",):
            fd = getattr(self, attr_name)
            setattr(self, attr_name, None)
            if fd is not None:
                _close_quietly(fd)
        kq, self._kq = self._kq, None
        if kq is not None:
            try:
                kq.close()
            except OSError:
                pass

    # -- kevent helpers

    def _control(self, fd, flags, fflags):
        s = self._select
        self._kq.control(
            [s.kevent(fd, filter=s.KQ_FILTER_VNODE, flags=flags, fflags=fflags)], 0, 0
        )

    def _open_file(self):
        """Watch whatever the name points at now (nothing when missing).
        Returns the new file identity ``(st_dev, st_ino)`` or ``None``."""
        self._close_file()
        s = self._select
        try:
            fd = os.open(self.path, self._open_flags)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM):
                log.warn("cannot open {path} to watch it: {error}",
                         path=self.path, error=e)
            return None
        try:
            st = os.fstat(fd)
            self._control(
                fd,
                s.KQ_EV_ADD | s.KQ_EV_CLEAR,
                s.KQ_NOTE_WRITE
                | s.KQ_NOTE_EXTEND
                | s.KQ_NOTE_ATTRIB
                | s.KQ_NOTE_DELETE
                | s.KQ_NOTE_RENAME,
            )
        except BaseException:
            _close_quietly(fd)
            raise
        self._file_fd = fd
        self._file_id = (st.st_dev, st.st_ino)
        return self._file_id

    def _close_file(self):
        fd, self._file_fd = self._file_fd, None
        self._file_id = None
        if fd is not None:
            # Closing a descriptor removes its kevents from the kqueue.
            _close_quietly(fd)

    def _current_id(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    # -- reactor callbacks

    def _readable(self):
        # Runs inside the reactor's doRead: must never raise.
        try:
            if not self.running or self._kq is None:
                return
            events = self._kq.control(None, 16, 0)
            self._handle(events)
        except Exception:
            log.failure("kqueue event handling for {path} failed", path=self.path)

    def _handle(self, events):
        s = self._select
        changed = False
        reopen = False
        for event in events:
            if event.ident == self._dir_fd:
                if event.fflags & (s.KQ_NOTE_DELETE | s.KQ_NOTE_RENAME):
                    log.warn("the directory {directory} of {path} was deleted or "
                             "renamed; watching the file alone until it is "
                             "replaced", directory=self._dir, path=self.path)
                    changed = True
                if self._current_id() != self._file_id:
                    changed = reopen = True
            elif event.ident == self._file_fd:
                changed = True
                if event.fflags & (s.KQ_NOTE_DELETE | s.KQ_NOTE_RENAME):
                    reopen = True
        if reopen:
            self._open_file()
        if changed and self.running:
            _safe_call(self._callback, self.path, self)

    def _lost(self, reason):
        if self.running:
            log.warn("kqueue watch on {path} lost: {reason}",
                     path=self.path, reason=reason.getErrorMessage())
        self.running = False
        self._reader = None
        self._close_all()


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# stat polling


class PollingWatcher:
    """Poll ``os.stat(path)`` every ``interval`` seconds on ``clock``.

    The callback is made when ``(st_mtime_ns, st_size, st_ino, st_dev)``
    changes, including the file appearing or disappearing.  Not on
    ``start()``: the caller has just read the file.  A stat error other than
    "missing" (permission denied on the directory, a stale NFS handle) counts
    as its own state, so it is noticed once and the recovery is noticed too.

    Limit: a rewrite that keeps the size and lands in the same mtime tick as
    the previous one is missed (file systems with coarse timestamps); the
    web application's next write is seen.
    """

    def __init__(self, clock, path, callback, interval=1.0):
        if interval <= 0:
            raise ValueError("polling interval must be positive")
        self.path = os.path.abspath(os.fspath(path))
        self._clock = clock
        self._callback = callback
        self.interval = interval
        self._loop = None
        self._last = None

    @property
    def running(self):
        return self._loop is not None and self._loop.running

    def _signature(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            return ("error", e.errno)
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def start(self):
        if self.running:
            return
        self._last = self._signature()
        self._loop = task.LoopingCall(self._poll)
        self._loop.clock = self._clock
        d = self._loop.start(self.interval, now=False)
        # _poll never raises; this only keeps an unexpected failure visible.
        d.addErrback(lambda f: log.failure(
            "polling watch on {path} stopped", f, path=self.path))
        log.debug("polling {path} every {interval}s", path=self.path,
                  interval=self.interval)

    def stop(self):
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _poll(self):
        # Runs in a LoopingCall: must never raise.
        try:
            current = self._signature()
            if current == self._last:
                return
            self._last = current
        except Exception:
            log.failure("polling {path} failed", path=self.path)
            return
        _safe_call(self._callback, self.path, self)


# ---------------------------------------------------------------------------
# choice


def make_watcher(reactor, path, callback, mode="auto", interval=1.0):
    """A started-not watcher for ``path``: call its ``start()``.

    ``mode``: ``"auto"`` picks inotify on Linux when it works, kqueue where
    ``select.kqueue`` exists, stat polling otherwise; ``"poll"`` forces stat
    polling every ``interval`` seconds (network file systems).
    """
    if mode not in ("auto", "poll"):
        raise ValueError(f"unknown watch mode {mode!r}; expected 'auto' or 'poll'")
    if mode == "auto" and inotify_available():
        watcher = _FallbackWatcher(
            InotifyWatcher(reactor, path, callback, fallback_interval=interval),
            lambda: PollingWatcher(reactor, path, callback, interval),
        )
        kind = "inotify"
    elif mode == "auto" and kqueue_available():
        watcher = _FallbackWatcher(
            KqueueWatcher(reactor, path, callback),
            lambda: PollingWatcher(reactor, path, callback, interval),
        )
        kind = "kqueue"
    else:
        watcher = PollingWatcher(reactor, path, callback, interval)
        kind = "poll"
    log.info("watching {path} for changes with {kind}{why}",
             path=os.path.abspath(os.fspath(path)), kind=kind,
             why=" (watch = \"poll\")" if mode == "poll" else "")
    watcher.kind = kind
    return watcher


class _FallbackWatcher:
    """A kernel watcher that turns into stat polling when it cannot start
    (the directory is missing, the inotify watch limit is reached)."""

    def __init__(self, primary, make_fallback):
        self._primary = primary
        self._make_fallback = make_fallback
        self.active = primary

    @property
    def path(self):
        return self._primary.path

    def start(self):
        try:
            self.active.start()
        except Exception as e:
            if self.active is not self._primary:
                raise
            log.warn("cannot watch {path} with {kind} ({error}); "
                     "falling back to stat polling",
                     path=self._primary.path, kind=type(self._primary).__name__,
                     error=e)
            self.active = self._make_fallback()
            self.active.start()

    def stop(self):
        self.active.stop()
