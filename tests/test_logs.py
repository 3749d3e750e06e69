import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from fido_tx.observe import logs
from fido_tx.config import LogSettings


def _emit(settings, **kw):
    stream = io.StringIO()
    publisher = LogPublisher(logs.make_observer(settings, stream=stream))
    log = Logger(namespace="fido_tx.observe.status", observer=publisher)
    log.info("acme-support ok: {messages} messages, {bytes} bytes", messages=3, bytes=4096, **kw)
    log.debug("a debug line {x}", x=1)
    return stream.getvalue()


class LogFormatTests(SynchronousTestCase):
    def test_text_is_one_line_with_time_level_and_module(self):
        out = _emit(LogSettings())
        lines = out.splitlines()
        self.assertEqual(len(lines), 1)
        self.assertRegex(
            lines[0],
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info  \[status\] acme-support ok: 3 messages, 4096 bytes$",
        )

    def test_json_is_one_object_a_line_with_the_format_fields(self):
        out = _emit(LogSettings(format="json"), account_id="acme-support")
        record = json.loads(out.splitlines()[0])
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["messages"], 3)
        self.assertEqual(record["bytes"], 4096)
        self.assertEqual(record["account_id"], "acme-support")
        self.assertEqual(record["message"], "acme-support ok: 3 messages, 4096 bytes")
        self.assertNotIn("log_format", record)

    def test_debug_level_shows_debug_lines(self):
        self.assertIn("a debug line 1", _emit(LogSettings(level="debug")))

    def test_error_level_hides_info(self):
        self.assertEqual(_emit(LogSettings(level="error")), "")

    def test_log_file_rotates_and_keeps_a_bounded_number(self):
        path = self.mktemp()
        settings = LogSettings(file=path, rotate_length=200, max_rotated_files=2)
        observer = logs.make_observer(settings)
        publisher = LogPublisher(observer)
        log = Logger(namespace="fido_tx.x", observer=publisher)
        for i in range(40):
            log.info("line {i} of padding padding padding", i=i)
        import glob

        rotated = glob.glob(path + ".*")
        self.assertEqual(len(rotated), 2)


class FormatMessageTests(SynchronousTestCase):
    """format_message: str.format_map for plain formats, formatEvent's text
    for everything else; the same words either way."""

    def check_same(self, fmt, **fields):
        from twisted.logger import formatEvent

        from fido_tx.observe.logs import format_message

        event = dict(fields, log_format=fmt, log_level=LogLevel.info, log_namespace="x",
                     log_time=0.0)
        self.assertEqual(format_message(event), formatEvent(event))
        return format_message(event)

    def test_plain_fields_specs_conversions_and_attributes(self):
        class Box:
            size = 3

        self.assertEqual(self.check_same("{a} got {n} in {s:.2f} s", a="acct", n=2, s=0.125),
                         "acct got 2 in 0.12 s")
        self.check_same("{a!r} {box.size} {d[k]}", a="x", box=Box(), d={"k": "v"})
        self.check_same("no fields at all")
        self.check_same("{{braces}} kept {a}", a=1)

    def test_what_format_map_cannot_do_goes_to_format_event(self):
        self.check_same("{missing} field")
        self.check_same("{f()} called", f=lambda: "ok")
        self.check_same("{} positional")
        self.check_same("{a:d} wrong spec", a="text")

    def test_an_event_without_a_format(self):
        from fido_tx.observe.logs import format_message

        self.assertEqual(format_message({"log_level": LogLevel.info}), "")


class _Stream:
    """A log file that counts its writes and flushes."""

    def __init__(self):
        self.text, self.writes, self.flushes = "", 0, 0

    def write(self, data):
        self.text += data
        self.writes += 1

    def flush(self):
        self.flushes += 1


def _buffered(level="info", **kw):
    from twisted.internet import task

    clock, stream = task.Clock(), _Stream()
    observer = logs.make_observer(LogSettings(level=level, **kw), stream=stream, clock=clock)
    log = Logger(namespace="fido_tx.sources.imap.session", observer=LogPublisher(observer))
    return clock, stream, observer, log


class BufferedLogTests(SynchronousTestCase):
    def test_lines_of_one_interval_go_out_in_one_write_within_the_interval(self):
        clock, stream, _, log = _buffered()
        for i in range(50):
            log.info("session a{i}: 0 new", i=i)
        self.assertEqual(stream.writes, 0)
        clock.advance(logs.FLUSH_INTERVAL)
        self.assertEqual((stream.writes, stream.flushes), (1, 1))
        lines = stream.text.splitlines()
        self.assertEqual(len(lines), 50)
        self.assertTrue(lines[0].endswith("[imap.session] session a0: 0 new"))
        self.assertTrue(lines[-1].endswith("session a49: 0 new"))
        self.assertEqual(clock.getDelayedCalls(), [])  # an idle daemon has no timer

    def test_flush_writes_what_is_buffered_and_cancels_the_timer(self):
        clock, stream, observer, log = _buffered()
        log.info("stopping")
        observer.flush()
        self.assertIn("stopping", stream.text)
        self.assertEqual(clock.getDelayedCalls(), [])
        observer.flush()
        self.assertEqual(stream.writes, 1)  # nothing left: no empty write

    def test_an_error_line_is_written_at_once_after_the_lines_before_it(self):
        _, stream, _, log = _buffered()
        log.info("first")
        log.error("redis down: {why}", why="refused")
        self.assertEqual([line.split("] ")[1] for line in stream.text.splitlines()],
                         ["first", "redis down: refused"])

    def test_a_full_buffer_is_written_without_waiting(self):
        _, stream, _, log = _buffered()
        for _ in range(logs.FLUSH_SIZE // 60 + 1):
            log.info("x" * 60)
        self.assertEqual(stream.writes, 1)

    def test_lines_below_the_level_are_dropped_and_arm_nothing(self):
        clock, stream, _, log = _buffered(level="warn")
        log.info("not shown")
        log.debug("not shown")
        self.assertEqual(clock.getDelayedCalls(), [])
        log.warn("shown")
        clock.advance(logs.FLUSH_INTERVAL)
        self.assertEqual(stream.text.count("\n"), 1)
        self.assertIn("shown", stream.text)

    def test_a_line_from_another_thread_is_written_through(self):
        import threading

        clock, stream, _, log = _buffered()
        t = threading.Thread(target=lambda: log.info("from the pool"))
        t.start()
        t.join()
        self.assertIn("from the pool", stream.text)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_line_that_cannot_be_formatted_loses_nothing_else(self):
        clock, stream, _, log = _buffered(format="json")
        log.info("ok {n}", n=1)
        log.info("bad {missing}")
        clock.advance(logs.FLUSH_INTERVAL)
        self.assertEqual(len(stream.text.splitlines()), 2)
