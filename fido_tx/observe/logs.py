"""Log output for sysadmins: one line per event, text or JSON, level-filtered.

twistd asks the application for an ``ILogObserver`` component before it falls
back to ``--logfile``; :class:`~fido_tx.service.FidoService` installs the one
made here, so ``[log] level``, ``format`` and ``file`` apply under twistd.
Where it writes, first hit wins: ``[log] file`` (rotated at
``rotate_length`` bytes, keeping ``max_rotated_files`` old files, which
twistd's own ``--logfile`` does not bound), twistd's ``--logfile``, standard
output.  With ``--syslog`` twistd's syslog observer is left alone.

Under the daemon (:func:`make_observer` given the reactor) lines are written
in batches: an event below the level is dropped by one set lookup, a line is
formatted once and appended to a buffer, and the buffer goes to the file in
one write (and one flush) at most ``flush_interval`` (0.1 s) after its first
line, at once for an ``error``/``critical`` line, when the buffer passes
64 KiB, when the daemon stops and at interpreter exit.  A SIGKILL'd or
OOM-killed daemon can lose at most the last 0.1 s of lines.
"""

import atexit
import json
import os
import sys
import threading
import time

from fido_tx.timefmt import iso_utc

from twisted.logger import (
    ILogObserver,
    LogLevel,
    formatEvent,
)
from twisted.python import logfile
from zope.interface import implementer

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

# Event keys that are Twisted's own bookkeeping, not fields for the reader.
_INTERNAL = frozenset(
    ["log_logger", "log_source", "log_format", "log_flattened", "log_io",
     "log_legacy", "log_trace", "log_text", "log_system", "format", "message",
     "isError", "system", "time", "log_time", "log_level", "log_namespace",
     "log_failure", "why"]
)


#: package names left out of the module shown in a log line
_ROOMS = frozenset(["observe", "schedule", "accounts", "sources", "sinks", "cmd"])


def _timestamp(event):
    return iso_utc(event.get("log_time") or time.time())


def format_message(event):
    """The event's message: ``str.format_map`` (C) for a plain format, else
    Twisted's ``formatEvent`` (its pure-Python formatter, 10x slower per
    line: a session's one log line was most of the CPU of its log work).
    A format calling a method (``{f()}``), naming a missing field or failing
    in any way falls back to ``formatEvent``, which says so in its text."""
    fmt = event.get("log_format")
    if fmt.__class__ is str and "(" not in fmt:
        try:
            return fmt.format_map(event)
        except Exception:  # noqa: BLE001 - formatEvent tells what is wrong with it
            pass
    return formatEvent(event)


def _text(event):
    level = event.get("log_level", LogLevel.info).name
    namespace = event.get("log_namespace", "-")
    if namespace.startswith("fido_tx."):
        # the room is not news to a sysadmin: "[status]", "[imap.session]"
        namespace = namespace[len("fido_tx."):]
        room, _, rest = namespace.partition(".")
        if rest and room in _ROOMS:
            namespace = rest
    message = format_message(event)
    failure = event.get("log_failure")
    if failure is not None:
        message = f"{message}\n{failure.getTraceback()}".rstrip()
    return f"{_timestamp(event)} {level:<5} [{namespace}] {message}\n"


def _json_value(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return str(v)


def _json(event):
    record = {
        "time": _timestamp(event),
        "level": event.get("log_level", LogLevel.info).name,
        "namespace": event.get("log_namespace", "-"),
        "message": format_message(event),
    }
    for key, value in event.items():
        if key not in _INTERNAL and not key.startswith("_"):
            record[key] = _json_value(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one line (two for a traceback) and flushes."""

    def __init__(self, stream, fmt="text"):
        self._stream = stream
        self._format = _json if fmt == "json" else _text

    def __call__(self, event):
        try:
            self._stream.write(self._format(event))
            self._stream.flush()
        except Exception:  # noqa: BLE001 - a log failure must not kill the daemon
            pass


def open_rotating(path, rotate_length, max_rotated_files):
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return logfile.LogFile(
        name, directory, rotateLength=rotate_length, maxRotatedFiles=max_rotated_files
    )


#: seconds a buffered line waits at most before it is written
FLUSH_INTERVAL = 0.1
#: buffered characters that trigger a write at once
FLUSH_SIZE = 64 * 1024
#: levels written (and flushed) at once: a crash may follow them
_URGENT = frozenset([LogLevel.error, LogLevel.critical])


@implementer(ILogObserver)
class BufferedLineObserver:
    """Level filter, formatter and batch writer in one observer.

    One event costs a set lookup when below the level; a line above it is
    formatted once and buffered.  The buffer is written in one ``write`` and
    one ``flush`` (``LogFile`` takes its lock once per batch, not per line)
    by one ``clock.callLater(flush_interval)`` armed by the first line of a
    batch: a busy daemon logging hundreds of session lines a second makes
    ten writes a second, an idle one none.  Lines logged from another thread
    (Twisted's thread pool) are written through, under the stream's lock.
    """

    def __init__(self, stream, fmt="text", level=LogLevel.info, clock=None,
                 flush_interval=FLUSH_INTERVAL, flush_size=FLUSH_SIZE):
        self._stream = stream
        self._format = _json if fmt == "json" else _text
        self._levels = frozenset(lv for lv in LogLevel.iterconstants() if lv >= level)
        self._clock = clock
        self._interval = flush_interval
        self._size = flush_size
        self._buffer = []
        self._buffered = 0
        self._call = None
        self._thread = threading.get_ident()
        self._lock = threading.Lock()
        if clock is not None:
            atexit.register(self.flush)

    def __call__(self, event):
        level = event.get("log_level")
        if level not in self._levels:
            return
        try:
            line = self._format(event)
        except Exception:  # noqa: BLE001 - a log failure must not kill the daemon
            return
        if threading.get_ident() != self._thread:
            # not the reactor's thread: no timer from here, and the buffer
            # is the reactor thread's alone; a line may come up to one
            # flush interval ahead of buffered ones
            with self._lock:
                self._write_lines([line])
            return
        if self._clock is None or level in _URGENT:
            self._buffer.append(line)
            self.flush()
            return
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= self._size:
            self.flush()
        elif self._call is None:
            self._call = self._clock.callLater(self._interval, self._timed_flush)

    def _timed_flush(self):
        self._call = None
        self.flush()

    def flush(self):
        """Write the buffered lines now (at stop, exit, or by the timer)."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        with self._lock:
            self._write()

    def _write(self):
        lines, self._buffer, self._buffered = self._buffer, [], 0
        if lines:
            self._write_lines(lines)

    def _write_lines(self, lines):
        try:
            self._stream.write(lines[0] if len(lines) == 1 else "".join(lines))
            self._stream.flush()
        except Exception:  # noqa: BLE001 - a log failure must not kill the daemon
            pass


def make_observer(log_settings, stream=None, twistd_logfile="", clock=None):
    """The level-filtered observer for ``log_settings`` (a LogSettings).

    With ``clock`` (the reactor) lines are written in batches
    (:class:`BufferedLineObserver`), else each as it comes."""
    if stream is None:
        if log_settings.file:
            stream = open_rotating(
                log_settings.file, log_settings.rotate_length, log_settings.max_rotated_files
            )
        elif twistd_logfile and twistd_logfile != "-":
            stream = logfile.LogFile.fromFullPath(
                twistd_logfile,
                rotateLength=log_settings.rotate_length,
                maxRotatedFiles=log_settings.max_rotated_files,
            )
        else:
            stream = sys.stdout
    return BufferedLineObserver(stream, log_settings.format, LEVELS[log_settings.level],
                                clock=clock)


def json_observer():
    """For ``twistd --logger fido_tx.observe.logs.json_observer``: JSON lines on stdout."""
    return LineObserver(sys.stdout, "json")
