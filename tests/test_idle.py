"""IMAP IDLE on one connection (fido_tx.sources.imap.idle).

Synchronous: a StringTransport and a Clock drive FidoIMAP4Client, so every
line sent and every deadline is checked exactly.
"""

import socket

from twisted.internet import error as ierror
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase

from fido_tx import errors
from fido_tx.errors import FidoError
from fido_tx.sources.imap import idle
from fido_tx.sources.imap.client import FidoIMAP4Client, ImapCommandError


def connected():
    clock = task.Clock()
    client = FidoIMAP4Client(clock, greeting_timeout=10, command_timeout=5)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK [CAPABILITY IMAP4rev1 IDLE] hi\r\n")
    return client, transport, clock


def sent(transport):
    """Lines the client wrote since the last call."""
    data = transport.value()
    transport.clear()
    return data.split(b"\r\n")[:-1]


def lose(client, reason=None):
    client.connectionLost(failure.Failure(reason or ierror.ConnectionAborted()))


class IdleTests(SynchronousTestCase):
    def start(self, refresh=600, exists=3, **kw):
        client, transport, clock = connected()
        idler = idle.Idle(client, clock, refresh=refresh, done_timeout=5, exists=exists, **kw)
        d = idler.start()
        [line] = sent(transport)
        tag = line.split()[0]
        self.assertEqual(line, tag + b" IDLE")
        return client, transport, clock, idler, d, tag

    def test_exists_wakes_with_done_then_ok_ends(self):
        client, transport, clock, idler, d, tag = self.start()
        client.dataReceived(b"+ idling\r\n")
        self.assertTrue(idler.idling)
        self.assertEqual(sent(transport), [])
        clock.advance(100)
        client.dataReceived(b"* 4 EXISTS\r\n")
        self.assertEqual(sent(transport), [b"DONE"])
        self.assertNoResult(d)
        client.dataReceived(tag + b" OK Idle completed\r\n")
        end = self.successResultOf(d)
        self.assertEqual(end, idle.IdleEnd(reason=idle.WAKE, exists=4, seconds=100.0, woken=True))
        self.assertFalse(idler.idling)

    def test_exists_not_above_known_does_not_wake(self):
        client, transport, clock, idler, d, tag = self.start(exists=3)
        client.dataReceived(b"+ idling\r\n* 3 EXISTS\r\n* 2 EXPUNGE\r\n* 2 EXISTS\r\n")
        self.assertEqual(sent(transport), [])
        client.dataReceived(b"* 3 EXISTS\r\n")  # one new after the expunge
        self.assertEqual(sent(transport), [b"DONE"])

    def test_recent_wakes_and_still_here_does_not(self):
        client, transport, clock, idler, d, tag = self.start(exists=None)
        client.dataReceived(b"+ idling\r\n* OK Still here\r\n* 0 RECENT\r\n")
        self.assertEqual(sent(transport), [])
        client.dataReceived(b"* 1 RECENT\r\n")
        self.assertEqual(sent(transport), [b"DONE"])

    def test_flag_change_wakes_only_for_unseen_when_asked(self):
        client, transport, clock, idler, d, tag = self.start(wake_on_unseen=True)
        client.dataReceived(b"+ idling\r\n* 2 FETCH (FLAGS (\\Seen))\r\n")
        self.assertEqual(sent(transport), [])
        client.dataReceived(b"* 2 FETCH (FLAGS (\\Answered))\r\n")
        self.assertEqual(sent(transport), [b"DONE"])
        client2, transport2, _, _, _, _ = self.start(wake_on_unseen=False)
        client2.dataReceived(b"+ idling\r\n* 2 FETCH (FLAGS ())\r\n")
        self.assertEqual(sent(transport2), [])

    def test_refresh_sends_done_after_refresh_seconds(self):
        client, transport, clock, idler, d, tag = self.start(refresh=600)
        client.dataReceived(b"+ idling\r\n")
        clock.advance(599)
        self.assertEqual(sent(transport), [])
        self.assertFalse(transport.disconnecting)  # silence while idling is fine
        clock.advance(1)
        self.assertEqual(sent(transport), [b"DONE"])
        client.dataReceived(tag + b" OK done\r\n")
        end = self.successResultOf(d)
        self.assertEqual(end.reason, idle.REFRESH)
        self.assertFalse(end.woken)
        self.assertIsNone(idler._timer)  # the refresh timer is gone

    def test_silent_server_after_done_times_out(self):
        client, transport, clock, idler, d, tag = self.start(refresh=600)
        client.dataReceived(b"+ idling\r\n")
        clock.advance(600)
        self.assertEqual(sent(transport), [b"DONE"])
        clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        lose(client)
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.TIMEOUT)
        self.assertIn("DONE", err.message)

    def test_no_continuation_times_out(self):
        client, transport, clock, idler, d, tag = self.start()
        clock.advance(5.1)
        self.assertTrue(transport.disconnecting)
        lose(client)
        self.assertIn("IDLE", self.failureResultOf(d, FidoError).value.message)

    def test_stop_before_continuation_waits_for_it(self):
        client, transport, clock, idler, d, tag = self.start()
        idler.stop()
        self.assertEqual(sent(transport), [])  # DONE only after the "+"
        client.dataReceived(b"+ idling\r\n")
        self.assertEqual(sent(transport), [b"DONE"])
        idler.stop()
        client.dataReceived(b"* 9 EXISTS\r\n")
        self.assertEqual(sent(transport), [])  # DONE exactly once
        client.dataReceived(tag + b" OK done\r\n")
        end = self.successResultOf(d)
        self.assertEqual(end.reason, idle.STOP)
        self.assertTrue(end.woken)  # mail came while it ended: the owner fetches

    def test_bye_mid_idle_fails_with_the_servers_words(self):
        client, transport, clock, idler, d, tag = self.start()
        client.dataReceived(b"+ idling\r\n* BYE Disconnected for inactivity\r\n")
        lose(client, ierror.ConnectionDone())
        err = self.failureResultOf(d, FidoError).value
        self.assertEqual(err.kind, errors.PROTOCOL)
        self.assertIn("Disconnected for inactivity", err.message)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_refused_idle_is_a_command_error(self):
        client, transport, clock, idler, d, tag = self.start()
        client.dataReceived(tag + b" BAD Unknown command\r\n")
        self.failureResultOf(d, ImapCommandError)
        self.assertFalse(transport.disconnecting)  # the connection can still poll

    def test_second_continuation_is_a_protocol_error(self):
        client, transport, clock, idler, d, tag = self.start()
        client.dataReceived(b"+ idling\r\n+ again\r\n")
        self.assertTrue(transport.disconnecting)
        lose(client)
        self.assertEqual(self.failureResultOf(d, FidoError).value.kind, errors.PROTOCOL)

    def test_server_ends_idle_by_itself(self):
        client, transport, clock, idler, d, tag = self.start()
        client.dataReceived(b"+ idling\r\n" + tag + b" OK timeout\r\n")
        self.assertEqual(self.successResultOf(d).reason, idle.SERVER)
        self.assertEqual(sent(transport), [])
        self.assertIsNone(idler._timer)

    def test_idling_keeps_no_old_protocol_lines(self):
        client, transport, clock, idler, d, tag = self.start()
        self.assertTrue(client.trace)
        client.dataReceived(b"+ idling\r\n")
        self.assertEqual(client.trace, [])
        client.dataReceived(b"* 4 EXISTS\r\n")
        self.assertEqual(client.trace, ["S: * 4 EXISTS", "C: DONE"])

    def test_on_idling_called_once_server_accepts(self):
        calls = []
        client, transport, clock, idler, d, tag = self.start(on_idling=lambda: calls.append(1))
        self.assertEqual(calls, [])
        client.dataReceived(b"+ idling\r\n")
        self.assertEqual(calls, [1])

    def test_next_command_after_idle_is_accepted(self):
        client, transport, clock, idler, d, tag = self.start()
        client.dataReceived(b"+ idling\r\n* 4 EXISTS\r\n" + tag + b" OK done\r\n")
        sent(transport)
        p = idle.probe(client, timeout=5, exists=4)
        [line] = sent(transport)
        self.assertTrue(line.endswith(b" NOOP"))
        client.dataReceived(line.split()[0] + b" OK NOOP\r\n")
        self.assertEqual(self.successResultOf(p), (False, 4))


class ParseTests(SynchronousTestCase):
    def test_parse_untagged(self):
        self.assertEqual(idle.parse_untagged(b"12 EXISTS"), (b"EXISTS", 12))
        self.assertEqual(idle.parse_untagged(b"3 fetch (FLAGS ())"), (b"FETCH", 3))
        self.assertEqual(idle.parse_untagged(b"OK Still here"), (b"", None))
        self.assertEqual(idle.parse_untagged(b""), (b"", None))

    def test_supports_idle(self):
        self.assertTrue(idle.supports_idle(frozenset([b"IMAP4REV1", b"IDLE"])))
        self.assertFalse(idle.supports_idle(frozenset([b"IMAP4REV1"])))


class ProbeTests(SynchronousTestCase):
    def test_probe_sees_new_mail(self):
        client, transport, clock = connected()
        p = idle.probe(client, timeout=5, exists=2)
        tag = sent(transport)[0].split()[0]
        client.dataReceived(b"* 3 EXISTS\r\n" + tag + b" OK NOOP\r\n")
        self.assertEqual(self.successResultOf(p), (True, 3))

    def test_silent_server_fails_the_probe(self):
        client, transport, clock = connected()
        p = idle.probe(client, timeout=5)
        clock.advance(5.1)
        self.assertTrue(transport.disconnecting)
        lose(client)
        err = self.failureResultOf(p, FidoError).value
        self.assertEqual(err.kind, errors.TIMEOUT)
        self.assertIn("NOOP", err.message)

    def test_logout_closes_whatever_happens(self):
        client, transport, clock = connected()
        d = idle.logout(client, timeout=2)
        self.assertTrue(sent(transport)[0].endswith(b" LOGOUT"))
        clock.advance(2.1)
        self.assertTrue(transport.disconnecting)
        lose(client)
        self.successResultOf(d)
        self.successResultOf(idle.logout(client, timeout=2))  # closed: nothing to do


class KeepaliveTests(SynchronousTestCase):
    def test_keepalive_on_the_tcp_socket_under_tls(self):
        a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(a.close)

        class TCP:
            on = None

            def setTcpKeepAlive(self, value):
                self.on = value

            def getHandle(self):
                return a

        class TLS:
            transport = TCP()

        tls = TLS()
        self.assertTrue(idle.keepalive(tls, idle=30, interval=5, count=3))
        self.assertEqual(tls.transport.on, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            self.assertEqual(a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 30)
            self.assertEqual(a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT), 3)

    def test_no_tcp_transport(self):
        self.assertFalse(idle.keepalive(StringTransport()))


class DeadlineTests(SynchronousTestCase):
    def test_a_sooner_deadline_replaces_the_call_instead_of_resetting_it(self):
        # DelayedCall.reset() to a sooner time is a linear search of the
        # reactor's heap: with thousands of held connections it made every
        # DONE and LOGOUT cost milliseconds (stopping 10,000 took 5 minutes)
        client, transport, clock = connected()
        client.command(b"IDLE", timeout=600)
        clock.advance(11)  # the greeting's call fires and waits for the new deadline
        [old] = [c for c in clock.getDelayedCalls() if c.active()]
        old.reset = None  # would raise if used
        client.rearm(5, "DONE")
        self.assertTrue(old.cancelled)
        [new] = [c for c in clock.getDelayedCalls() if c.active()]
        self.assertEqual(new.getTime(), clock.seconds() + 5)
        clock.advance(5.1)
        self.assertTrue(transport.disconnecting)


class LogoutTests(SynchronousTestCase):
    def test_no_logout_while_a_command_is_in_flight(self):
        client, transport, clock = connected()
        client.command(b"UID", b"FETCH 1:* (BODY.PEEK[])")
        sent(transport)
        d = idle.logout(client, timeout=2)
        self.successResultOf(d)
        self.assertEqual(sent(transport), [])  # no second command: it would be refused
        self.assertTrue(transport.disconnecting)
