"""Start-up errors are one line, not a traceback (``twistd -n fido`` in a
child process); the HTTP endpoint warns when it listens beyond loopback; the
reporter reads at most a small bounded part of a hostile endpoint's answer."""

import json
import os
import socket
import subprocess

import pytest
import pytest_twisted
from twisted.internet import defer, interfaces, reactor
from twisted.logger import globalLogPublisher
from twisted.web import resource, server
from zope.interface import implementer

from fido_tx import config
from fido_tx.observe import report as report_mod
from fido_tx.observe import web
from tests import daemon
from tests.support.redis_server import free_port


def start_once(tmp_path, extra="", accounts=True):
    """Run ``twistd -n fido`` until it exits (it must: the config is refused)."""
    directory = str(tmp_path)
    if accounts:
        daemon.write_accounts(os.path.join(directory, "accounts.json"), [])
    config_path = os.path.join(directory, "fido.toml")
    daemon.write_config(config_path, directory, f"redis://127.0.0.1:{free_port()}/0")
    if extra:
        with open(config_path) as f:
            text = f.read().replace('[http]\nlisten = ""\n', "")
        with open(config_path, "w") as f:
            f.write(text + extra)
    proc = subprocess.run(
        [daemon.twistd(), "-n", "--pidfile=", "fido", "--config", config_path],
        cwd=directory, capture_output=True, timeout=60,
    )
    output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    return proc.returncode, output


def assert_one_line(output, expected):
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("fido: ")]
    assert len(lines) == 1, output
    assert expected in lines[0], output


def test_http_listen_that_cannot_be_parsed_stops_the_start_with_one_line(tmp_path):
    code, output = start_once(tmp_path, '[http]\nlisten = "bogus:x"\n')
    assert code != 0
    assert_one_line(output, "[http] listen: cannot use 'bogus:x'")


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    try:
        code, output = start_once(tmp_path, f'[http]\nlisten = "tcp:{port}:interface=127.0.0.1"\n')
    finally:
        sock.close()
    assert code != 0
    assert_one_line(output, f"[http] listen 'tcp:{port}:interface=127.0.0.1': Couldn't listen")


def test_a_log_file_that_is_a_directory_stops_the_start_with_one_line(tmp_path):
    os.mkdir(tmp_path / "logs")
    code, output = start_once(tmp_path, '[log]\nfile = "logs"\n')
    assert code != 0
    assert_one_line(output, "[log] file: ")


def test_an_accounts_file_that_is_a_fifo_stops_the_start_with_one_line(tmp_path):
    os.mkfifo(tmp_path / "accounts.json")
    code, output = start_once(tmp_path, accounts=False)
    assert code != 0
    assert_one_line(output, "is a FIFO (named pipe), not a regular accounts file")


def test_listening_beyond_loopback_logs_a_warning(tmp_path):
    from fido_tx import service

    directory = str(tmp_path)
    daemon.write_accounts(os.path.join(directory, "accounts.json"), [])
    settings = daemon.settings_for(directory, f"redis://127.0.0.1:{free_port()}/0")
    settings = settings.__class__(**{
        **{f: getattr(settings, f) for f in ("fido", "imap", "backoff", "redis", "reporter",
                                            "log", "path")},
        "http": config.HttpSettings(listen="tcp:0:interface=0.0.0.0"),
    })
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        top = service.make_service(settings, reactor, observer=False)
    finally:
        globalLogPublisher.removeObserver(events.append)
    ports = [s for s in top if isinstance(s, web.HttpService)]
    assert len(ports) == 1
    ports[0].stopService()
    warnings = [e for e in events if "beyond loopback" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert warnings[0]["address"].startswith("0.0.0.0:")


# -- the reporter against a hostile endpoint -----------------------------------


@implementer(interfaces.IPullProducer)
class _Endless:
    """An endless response body, one 64 KiB chunk at a time, counted."""

    def __init__(self, request, prefix):
        self.request = request
        self.chunks = [prefix]
        self.sent = 0
        self.stopped = False

    def resumeProducing(self):
        chunk = self.chunks.pop() if self.chunks else b"\x1b[2J\nFAKE: forged line\n" * 2800
        self.sent += len(chunk)
        self.request.write(chunk)

    def stopProducing(self):
        self.stopped = True


class _Hostile(resource.Resource):
    isLeaf = True

    def __init__(self, code):
        super().__init__()
        self.code = code
        self.bodies = []

    def render_POST(self, request):
        request.setResponseCode(self.code)
        body = _Endless(request, b"bad request \x1b]0;owned\x07\r\nINFO forged: all ok\n")
        self.bodies.append(body)
        request.registerProducer(body, False)
        request.notifyFinish().addErrback(lambda _: None)
        return server.NOT_DONE_YET


@pytest.mark.parametrize("code", [400, 503])
@pytest_twisted.inlineCallbacks
def test_reporter_reads_a_bounded_part_of_an_endless_answer_and_escapes_it(code):
    hostile = _Hostile(code)
    port = reactor.listenTCP(0, server.Site(hostile), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/errors"
    reporter = report_mod.Reporter(
        reactor, config.ReporterSettings(url=url, token="tok-secret", timeout=5),
        retry_initial=60, retry_max=60)
    events = []
    globalLogPublisher.addObserver(events.append)
    reporter.startService()
    try:
        reporter.report("acct", "auth", "login failed")
        deadline = reactor.seconds() + 10
        while not (reporter.rejected or reporter.retries) and reactor.seconds() < deadline:
            yield _sleep(0.05)
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield reporter.stopService()
        yield port.stopListening()
    assert reporter.rejected + reporter.retries == 1
    sent = sum(b.sent for b in hostile.bodies)
    # the reporter stops after 64 KiB; socket buffers hold a few MiB at most
    assert sent < 16 * 1024 * 1024, f"the endpoint got to send {sent} bytes"
    lines = [e for e in events if e.get("log_namespace", "").endswith("Reporter")
             or "report for" in e.get("log_format", "") or "rejected" in e.get("log_format", "")]
    from twisted.logger import formatEvent

    text = "\n".join(formatEvent(e) for e in lines)
    if code == 400:
        assert "bad request \\x1b]0;owned\\x07\\x0d\\x0aINFO forged" in text, text
    for e in lines:
        formatted = formatEvent(e)
        assert "\x1b" not in formatted and "\n" not in formatted, formatted


def _sleep(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def test_reporter_settings_refuse_user_info(tmp_path):
    path = tmp_path / "fido.toml"
    path.write_text('[reporter]\nurl = "https://user:pw@example.com/x"\n')
    with pytest.raises(config.ConfigError) as e:
        config.read_settings(str(path))
    assert "pw@" not in str(e.value)
    assert json.dumps(str(e.value))  # one plain line
