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
