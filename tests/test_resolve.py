"""The host name cache in front of the reactor's resolver."""

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fido_tx.resolve import CachingResolver, install


@implementer(IHostnameResolver)
class FakeResolver:
    """Answers from a dict, counting the questions; unknown names fail."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(object())
        for ip in self.answers.get(hostName, ()):
            receiver.addressResolved(IPv4Address("TCP", ip, portNumber))
        receiver.resolutionComplete()


@implementer(IResolutionReceiver)
class Receiver:
    def __init__(self):
        self.began = False
        self.addresses = []
        self.complete = False

    def resolutionBegan(self, resolution):
        self.began = True

    def addressResolved(self, address):
        self.addresses.append(address)

    def resolutionComplete(self):
        self.complete = True


def resolve(resolver, name, port=993):
    r = Receiver()
    resolver.resolveHostName(r, name, port)
    return r


class CachingResolverTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.upstream = FakeResolver({"imap.example.test": ["192.0.2.7", "192.0.2.8"]})
        self.cache = CachingResolver(self.upstream, self.clock, ttl=60)

    def test_provides_the_interface(self):
        verifyObject(IHostnameResolver, self.cache)

    def test_a_second_lookup_within_the_ttl_is_answered_from_the_cache(self):
        first = resolve(self.cache, "imap.example.test")
        self.clock.advance(59)
        second = resolve(self.cache, "imap.example.test")
        self.assertEqual(self.upstream.asked, ["imap.example.test"])
        self.assertTrue(second.began and second.complete)
        self.assertEqual(second.addresses, first.addresses)
        self.assertEqual([a.host for a in second.addresses], ["192.0.2.7", "192.0.2.8"])

    def test_an_answer_older_than_the_ttl_is_asked_again(self):
        resolve(self.cache, "imap.example.test")
        self.clock.advance(60)
        resolve(self.cache, "imap.example.test")
        self.assertEqual(len(self.upstream.asked), 2)

    def test_a_failed_lookup_is_not_remembered(self):
        failed = resolve(self.cache, "nowhere.example.test")
        self.assertEqual((failed.addresses, failed.complete), ([], True))
        resolve(self.cache, "nowhere.example.test")
        self.assertEqual(self.upstream.asked, ["nowhere.example.test"] * 2)

    def test_ports_are_cached_apart(self):
        resolve(self.cache, "imap.example.test", 993)
        other = resolve(self.cache, "imap.example.test", 143)
        self.assertEqual(len(self.upstream.asked), 2)
        self.assertEqual({a.port for a in other.addresses}, {143})

    def test_the_cache_is_bounded(self):
        self.cache.max_entries = 2
        self.upstream.answers.update({"a": ["192.0.2.1"], "b": ["192.0.2.2"],
                                      "c": ["192.0.2.3"]})
        for name in "abc":
            resolve(self.cache, name)
        self.assertLessEqual(len(self.cache._answers), 2)


class InstallTests(SynchronousTestCase):
    def test_installs_once_in_front_of_the_reactors_resolver(self):
        reactor = MemoryReactorClock()
        original = reactor.nameResolver
        first = install(reactor)
        self.assertIs(reactor.nameResolver, first)
        self.assertIs(first.resolver, original)
        self.assertIs(install(reactor), first)  # not wrapped twice


class CachedTests(SynchronousTestCase):
    """``cached``: what a connector may use without a resolution."""

    def setUp(self):
        self.clock = Clock()
        self.upstream = FakeResolver({"one.example.test": ["192.0.2.7"]})
        self.cache = CachingResolver(self.upstream, self.clock, ttl=60)

    def test_nothing_before_a_resolution(self):
        self.assertIsNone(self.cache.cached("one.example.test", 993))

    def test_the_fresh_answer_after_one(self):
        resolve(self.cache, "one.example.test", 993)
        self.assertEqual([a.host for a in self.cache.cached("one.example.test", 993)],
                         ["192.0.2.7"])
        self.assertIsNone(self.cache.cached("one.example.test", 143))  # per port

    def test_nothing_once_the_answer_is_stale(self):
        resolve(self.cache, "one.example.test", 993)
        self.clock.advance(60)
        self.assertIsNone(self.cache.cached("one.example.test", 993))


class ConnectorEndpointTests(SynchronousTestCase):
    """The connector skips ``HostnameEndpoint`` when one address is known."""

    def setUp(self):
        from fido_tx.sources.imap.connect import Connector

        self.reactor = MemoryReactorClock()
        self.upstream = FakeResolver({"one.example.test": ["192.0.2.7"],
                                      "two.example.test": ["192.0.2.8", "192.0.2.9"]})
        self.reactor.installNameResolver(CachingResolver(self.upstream, self.reactor))
        self.connector = Connector(self.reactor)

    def test_an_ip_address_is_connected_to_directly(self):
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

        self.assertIsInstance(self.connector.direct_endpoint("192.0.2.1", 993),
                              TCP4ClientEndpoint)
        self.assertIsInstance(self.connector.direct_endpoint("::1", 993),
                              TCP6ClientEndpoint)

    def test_a_name_needs_a_resolution_first(self):
        self.assertIsNone(self.connector.direct_endpoint("one.example.test", 993))
        resolve(self.reactor.nameResolver, "one.example.test", 993)
        endpoint = self.connector.direct_endpoint("one.example.test", 993)
        endpoint.connect(object())
        host, port, _, timeout, _ = self.reactor.tcpClients[-1]
        # no timer of the endpoint's own: Connector.connect arms one
        self.assertEqual((host, port, timeout), ("192.0.2.7", 993, None))
        self.assertIs(self.connector.direct_endpoint("one.example.test", 993), endpoint)

    def test_several_addresses_are_left_to_the_hostname_endpoint(self):
        resolve(self.reactor.nameResolver, "two.example.test", 993)
        self.assertIsNone(self.connector.direct_endpoint("two.example.test", 993))

    def test_a_stale_answer_is_resolved_again(self):
        resolve(self.reactor.nameResolver, "one.example.test", 993)
        self.reactor.advance(61)
        self.assertIsNone(self.connector.direct_endpoint("one.example.test", 993))

    def test_without_the_cache_nothing_is_direct_but_addresses(self):
        from fido_tx.sources.imap.connect import Connector

        bare = Connector(MemoryReactorClock())
        self.assertIsNone(bare.direct_endpoint("one.example.test", 993))
