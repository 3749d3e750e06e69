"""The ``[http] listen`` port: bound at start, its twisted.web site built on the first connection.

twisted.web's server (3.6 MiB of an idle daemon) is imported when someone
first connects (a scrape, a health check, the status page), not at start;
the port is still bound at start, so a port in use stops the start with one
line (:func:`listen_now`).
"""

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.python import failure

from fido_tx import errors

__all__ = ["HttpService", "ListenError", "SiteOnFirstConnection", "beyond_loopback",
           "listen", "listen_now"]


class SiteOnFirstConnection(Factory):
    """A listening factory standing for the site ``make()`` returns, built
    (and started) for the first connection."""

    noisy = False

    def __init__(self, make):
        self._make = make
        #: the site, once built
        self.site = None

    def buildProtocol(self, addr):
        if self.site is None:
            self.site = self._make()
            self.site.doStart()
        return self.site.buildProtocol(addr)

    def stopFactory(self):
        site, self.site = self.site, None
        if site is not None:
            site.doStop()


class ListenError(errors.OneLineError):
    """``[http] listen`` cannot be listened on (one line, for the start)."""


def listen_now(reactor, endpoint_description, site):
    """Listen before the reactor runs: an address that cannot be used (a
    port in use, a bad description) stops the start with one line.

    :return: the ``IListeningPort``.
    :raises ListenError: one line naming the key and the reason.
    """
    try:
        d = serverFromString(reactor, endpoint_description).listen(site)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ListenError(f"[http] listen {endpoint_description!r}: {e}") from None
    box = []
    d.addBoth(box.append)
    if not box:  # an endpoint that listens later: nothing to tell now
        d.cancel()
        raise ListenError(f"[http] listen {endpoint_description!r}: did not listen at once")
    if isinstance(box[0], failure.Failure):
        reason = " ".join(box[0].getErrorMessage().split())
        raise ListenError(f"[http] listen {endpoint_description!r}: {reason}; change "
                          "[http] listen, or stop what holds the port")
    return box[0]


def beyond_loopback(port):
    """The ``host:port`` a listening port serves beyond loopback, or ``None``."""
    import ipaddress

    address = port.getHost()
    host = getattr(address, "host", None)
    if host is None:  # a UNIX socket
        return None
    try:
        if ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
            return None
    except ValueError:
        pass
    return f"{host}:{address.port}"


class HttpService(service.Service):
    """Owns the port :func:`listen_now` opened; closes it on stop."""

    def __init__(self, port):
        self.port = port

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


def listen(reactor, endpoint_description, site):
    """Listen on a ``serverFromString`` description; ``""`` = off.

    :return: Deferred firing with the ``IListeningPort`` (None when off).
    """
    if not endpoint_description:
        return defer.succeed(None)
    return serverFromString(reactor, endpoint_description).listen(site)
