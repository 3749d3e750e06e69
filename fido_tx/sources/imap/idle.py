"""IMAP IDLE (RFC 2177) and the small commands of a held connection.

:class:`Idle` runs one IDLE command on a connected, selected
:class:`~fido_tx.sources.imap.client.FidoIMAP4Client`:

- it sends ``IDLE`` and waits (``done_timeout``) for the ``+`` continuation;
- an untagged ``EXISTS`` above the count already known, or ``RECENT`` above
  0, *wakes* it: it sends ``DONE`` at once (a ``FETCH`` without ``\\Seen``,
  a message marked unread again, wakes it too when ``wake_on_unseen``);
- after ``refresh`` seconds it sends ``DONE`` (servers drop an IDLE older
  than 30 minutes; RFC 2177 asks clients to re-issue it within 29);
- :meth:`Idle.stop` sends ``DONE`` (shutdown, reload);
- ``DONE`` goes out before any other command, exactly once, and only after
  the ``+`` (a wake or stop before it is remembered); the server then has
  ``done_timeout`` to answer with the tagged ``OK``, or the connection is
  aborted (a silent server is found here and by :func:`probe`);
- a ``BYE`` or a closed connection errbacks with the connection's
  :class:`~fido_tx.errors.FidoError`; a tagged ``NO``/``BAD`` (a server
  that does not do IDLE after all) errbacks with
  :class:`~fido_tx.sources.imap.client.ImapCommandError`.

It ends with an :class:`IdleEnd` saying why.  :func:`probe` (``NOOP``),
:func:`logout` and :func:`keepalive` (TCP keepalive with short timers on the
socket under any TLS layers) are the other pieces of a held connection.
"""

import socket

import attr
from twisted.internet import defer
from twisted.python import failure

from fido_tx import errors
from fido_tx.errors import FidoError

#: why an IDLE ended
WAKE = "wake"  # new mail (EXISTS/RECENT): fetch
REFRESH = "refresh"  # ``refresh`` seconds went by: probe and IDLE again
STOP = "stop"  # the owner asked (:meth:`Idle.stop`)
SERVER = "server"  # the server ended it on its own (tagged OK without DONE)

#: TCP keepalive of a held connection: first probe after this many idle
#: seconds, then every ``_KEEPINTVL``; dead after ``_KEEPCNT`` unanswered
_KEEPIDLE = 60
_KEEPINTVL = 15
_KEEPCNT = 4


def supports_idle(capabilities):
    """Whether a server's capabilities (upper-case bytes) include IDLE."""
    return b"IDLE" in capabilities


@attr.s(frozen=True, slots=True, auto_attribs=True)
class IdleEnd:
    """How one IDLE ended."""

    #: :data:`WAKE`, :data:`REFRESH`, :data:`STOP` or :data:`SERVER`
    reason: str
    #: the last EXISTS count the server sent (or the one known before)
    exists: int | None
    #: seconds from sending IDLE to its tagged OK
    seconds: float
    #: True when new mail was announced (whatever the reason it ended)
    woken: bool = False


def parse_untagged(text):
    """``b"3 EXISTS"`` -> ``(b"EXISTS", 3)``; ``(b"", None)`` for other data.

    For ``FETCH`` the number is the sequence number.
    """
    parts = text.split(b" ", 2)
    if len(parts) < 2 or not parts[0].isdigit():
        return b"", None
    return parts[1].upper(), int(parts[0])


def _fetch_unseen(segments):
    """Whether an untagged FETCH carries FLAGS without ``\\Seen``."""
    text = b"".join(s for s in segments if isinstance(s, bytes)).upper()
    at = text.find(b"FLAGS (")
    if at == -1:
        return False
    flags = text[at + 7 : text.find(b")", at)]
    return b"\\SEEN" not in flags.split()


class Idle:
    """One IDLE command; see the module docstring.

    :param client: a logged-in :class:`FidoIMAP4Client` with a mailbox selected.
    :param clock: ``IReactorTime``.
    :param refresh: seconds before DONE is sent unasked (keep under 29 min).
    :param done_timeout: seconds the server has for ``+`` and for DONE's OK.
    :param exists: the message count known (SELECT's or the last EXISTS);
        an EXISTS at or below it does not wake (``None``: every EXISTS wakes).
    :param on_idling: called with no argument once the server accepted IDLE.
    """

    def __init__(self, client, clock, refresh, done_timeout, exists=None,
                 wake_on_unseen=False, on_idling=None):
        self.client = client
        self.clock = clock
        self.refresh = refresh
        self.done_timeout = done_timeout
        self.exists = exists
        self.wake_on_unseen = wake_on_unseen
        self.on_idling = on_idling
        #: True between the server's ``+`` and the end of the command
        self.idling = False
        self.woken = False
        self._reason = None  # why DONE is (to be) sent
        self._done_sent = False
        self._timer = None
        self._started = None

    def start(self):
        """Send IDLE; a Deferred firing with an :class:`IdleEnd`."""
        self._started = self.clock.seconds()
        d = self.client.command(b"IDLE", untagged=self._untagged,
                                continuation=self._continued,
                                timeout=self.done_timeout, what="IDLE")
        d.addBoth(self._finished)
        return d

    def stop(self):
        """End the IDLE (DONE now, or as soon as the server's ``+`` comes)."""
        self._end(STOP)

    # -- events ---------------------------------------------------------------

    def _continued(self, rest):
        if self.idling or self._done_sent:
            self.client.fail(FidoError(errors.PROTOCOL,
                                       "server sent a second continuation during IDLE"))
            return
        self.idling = True
        if self._reason is not None:  # woken or stopped before the server was ready
            self._send_done()
            return
        # silence is normal now: the deadline is the refresh, then DONE's answer
        self.client.rearm(self.refresh + self.done_timeout, "IDLE")
        self.client.clear_trace()  # thousands wait here: keep no old lines
        self._timer = self.clock.callLater(self.refresh, self._end, REFRESH)
        if self.on_idling is not None:
            self.on_idling()

    def _untagged(self, segments):
        what, number = parse_untagged(segments[0])
        if what == b"EXISTS":
            known, self.exists = self.exists, number
            if known is None or number > known:
                self._wake()
        elif what == b"RECENT":
            if number > 0:
                self._wake()
        elif what == b"EXPUNGE":
            if self.exists:
                self.exists -= 1
        elif what == b"FETCH" and self.wake_on_unseen and _fetch_unseen(segments):
            self._wake()

    def _wake(self):
        self.woken = True
        self._end(WAKE)

    def _end(self, reason):
        if self._reason is not None:
            return
        self._reason = reason
        if self.idling:
            self._send_done()

    def _send_done(self):
        if self._done_sent or self.client.closed or self.client.error is not None:
            return
        self._done_sent = True
        self._cancel_timer()
        self.client.sendLine(b"DONE")
        self.client.rearm(self.done_timeout, "DONE (end of IDLE)")

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finished(self, result):
        self._cancel_timer()
        self.idling = False
        self.on_idling = None
        if isinstance(result, failure.Failure):
            return result
        return IdleEnd(reason=self._reason or SERVER, exists=self.exists,
                       seconds=max(0.0, self.clock.seconds() - self._started),
                       woken=self.woken)


def probe(client, timeout, exists=None):
    """``NOOP``: proves the server still answers and collects what it held
    back.  Fires with ``(woken, exists)``: whether EXISTS/RECENT announced
    new mail (as :class:`Idle` judges it), and the message count."""
    state = {"exists": exists, "woken": False}

    def untagged(segments):
        what, number = parse_untagged(segments[0])
        if what == b"EXISTS":
            if state["exists"] is None or number > state["exists"]:
                state["woken"] = True
            state["exists"] = number
        elif what == b"RECENT" and number > 0:
            state["woken"] = True

    d = client.command(b"NOOP", untagged=untagged, timeout=timeout, what="NOOP (probe)")
    d.addCallback(lambda _: (state["woken"], state["exists"]))
    return d


def logout(client, timeout):
    """Say LOGOUT (``timeout`` seconds for its answer), then close the
    connection whatever happened; never fails."""
    if client.closed or client.error is not None or client.transport is None:
        return defer.succeed(None)
    if client.waiting or getattr(client.transport, "disconnecting", False):
        # a command cut short (a cancelled fetch) or an abort under way:
        # LOGOUT cannot go out now, and need not
        client.transport.abortConnection()
        return defer.succeed(None)
    client.logging_out = True
    d = client.command(b"LOGOUT", timeout=timeout)

    def close(_):
        if not client.closed and client.transport is not None:
            client.transport.abortConnection()

    d.addBoth(close)
    return d


def _tcp_transport(transport):
    """The TCP transport under any TLS layers (``None`` if there is none)."""
    seen = 0
    while transport is not None and seen < 4:
        if hasattr(transport, "setTcpKeepAlive"):
            return transport
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


def keepalive(transport, idle=_KEEPIDLE, interval=_KEEPINTVL, count=_KEEPCNT):
    """Turn on TCP keepalive with short timers (Linux: a peer gone for
    ``idle + interval * count`` seconds is noticed even while IDLE waits).

    :return: True when keepalive is on.
    """
    tcp = _tcp_transport(transport)
    if tcp is None:
        return False
    tcp.setTcpKeepAlive(1)
    handle = tcp.getHandle() if hasattr(tcp, "getHandle") else None
    if isinstance(handle, socket.socket):
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                            ("TCP_KEEPCNT", count)):
            option = getattr(socket, name, None)
            if option is not None:
                try:
                    handle.setsockopt(socket.IPPROTO_TCP, option, value)
                except OSError:  # pragma: no cover - the platform refuses: defaults
                    pass
    return True
