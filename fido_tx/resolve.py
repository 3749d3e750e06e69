"""A short-lived cache in front of the reactor's host name resolver.

Every mailbox session resolves its server's name.  Twisted's default
resolver runs ``getaddrinfo`` in a thread of the reactor's pool and wakes the
reactor when it returns: about 0.3 ms of CPU per session (a fifth of a TLS
session with nothing new), and with thousands of mailboxes on a handful of
servers, the same answer thousands of times a minute.

:class:`CachingResolver` keeps each successful answer for ``ttl`` seconds
(60 by default, what a sysadmin expects of a local resolver cache: a moved
server is followed within a minute) per (name, port, address types,
transport).  Failures are not kept: a name that failed is asked again on
the next connection.  The composition root installs it on the reactor
(:func:`install`), so the Redis connection and the reporter share it.
"""

from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from zope.interface import implementer

__all__ = ["CachingResolver", "install"]

DEFAULT_TTL = 60.0
MAX_ENTRIES = 4096


@implementer(IHostResolution)
class HostResolution:
    """A resolution answered from the cache (the public ``IHostResolution``:
    Twisted's own class of that name is private)."""

    def __init__(self, name):
        self.name = name

    def cancel(self):
        """Already complete: nothing to cancel."""


@implementer(IHostnameResolver)
class CachingResolver:
    """``resolver``'s answers, remembered for ``ttl`` seconds of ``clock``."""

    def __init__(self, resolver, clock, ttl=DEFAULT_TTL, max_entries=MAX_ENTRIES):
        self.resolver = resolver
        self._clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self._answers = {}  # key -> (expires_at, addresses)

    def resolveHostName(self, resolutionReceiver, hostName, portNumber=0,
                        addressTypes=None, transportSemantics="TCP"):
        key = (hostName, portNumber,
               None if addressTypes is None else tuple(addressTypes), transportSemantics)
        hit = self._answers.get(key)
        if hit is not None:
            expires_at, addresses = hit
            if expires_at > self._clock.seconds():
                resolution = HostResolution(hostName)
                resolutionReceiver.resolutionBegan(resolution)
                for address in addresses:
                    resolutionReceiver.addressResolved(address)
                resolutionReceiver.resolutionComplete()
                return resolution
            del self._answers[key]
        return self.resolver.resolveHostName(
            _Recorder(self, key, resolutionReceiver), hostName, portNumber,
            addressTypes, transportSemantics)

    def cached(self, hostName, portNumber=0):
        """The fresh cached addresses of ``hostName`` for a TCP connection
        (any address type), or ``None``: lets a connector that has the
        answer already skip the resolution machinery."""
        hit = self._answers.get((hostName, portNumber, None, "TCP"))
        if hit is None or hit[0] <= self._clock.seconds():
            return None
        return hit[1]

    def _remember(self, key, addresses):
        if len(self._answers) >= self.max_entries:
            self._answers.clear()
        self._answers[key] = (self._clock.seconds() + self.ttl, addresses)


@implementer(IResolutionReceiver)
class _Recorder:
    """Passes a resolution through and keeps its addresses if there were any."""

    def __init__(self, cache, key, receiver):
        self.cache = cache
        self.key = key
        self.receiver = receiver
        self.addresses = []

    def resolutionBegan(self, resolution):
        self.receiver.resolutionBegan(resolution)

    def addressResolved(self, address):
        self.addresses.append(address)
        self.receiver.addressResolved(address)

    def resolutionComplete(self):
        if self.addresses:
            self.cache._remember(self.key, tuple(self.addresses))
        self.receiver.resolutionComplete()


def install(reactor, ttl=DEFAULT_TTL):
    """Put a :class:`CachingResolver` in front of ``reactor``'s resolver.

    Does nothing for a reactor without pluggable name resolution, or when
    one is installed already (a second service in the same process).
    Returns the resolver in use.
    """
    pluggable = IReactorPluggableNameResolver(reactor, None)
    if pluggable is None:
        return None
    current = pluggable.nameResolver
    if isinstance(current, CachingResolver):
        return current
    caching = CachingResolver(current, reactor, ttl=ttl)
    pluggable.installNameResolver(caching)
    return caching
