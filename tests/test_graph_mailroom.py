"""A mail_room configuration of GitLab's Service Desk read through Microsoft
Graph, imported by ``fido import-mailroom``'s converter, runs against the fake
token endpoint and the fake Graph service on loopback."""

import json
import os

import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from fido_tx import mailroom
from fido_tx.accounts.model import parse_document
from fido_tx.credentials import oauth
from fido_tx.httpclient import HttpClient
from fido_tx.sources import graph, graphapi
from fido_tx.testing import MemorySink
from tests.support.graphserver import FakeGraph
from tests.support.oauthserver import FakeTokenEndpoint
from tests.test_graph import SourceContext, mime

DATA = os.path.join(os.path.dirname(__file__), "data", "mailroom", "gitlab_graph.yml")
TENANT = "11111111-2222-3333-4444-555555555555"
USER = "desk@contoso.onmicrosoft.com"


@pytest_twisted.inlineCallbacks
def test_imported_mailroom_graph_mailbox_runs_against_the_fake_graph(tmp_path):
    tokens = FakeTokenEndpoint(clock=reactor)
    tokens.add_client("66666666-7777-8888-9999-000000000000", "graph-S3cret")
    fake = FakeGraph(tokens=tokens, clock=reactor)
    root = Resource()
    v2 = Resource()
    tenant = Resource()
    oauth2 = Resource()
    root.putChild(TENANT.encode(), tenant)
    tenant.putChild(b"oauth2", oauth2)
    oauth2.putChild(b"v2.0", v2)
    v2.putChild(b"token", tokens)
    root.putChild(b"v1.0", fake)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    fake.base_url = base
    with open(DATA) as f:
        text = f.read()
    # the sovereign-cloud endpoints of the rendered config, pointed at the fakes
    text = text.replace("https://login.microsoftonline.us", base)
    text = text.replace("https://graph.microsoft.us", base)
    conversion = mailroom.convert(mailroom.load_yaml(text, "gitlab_graph.yml"))
    loaded = parse_document(json.loads(mailroom.accounts_json(conversion)))
    assert not loaded.problems, loaded.problems
    [account] = loaded.accounts
    assert (account.source, account.user, account.after_fetch) == ("graph", USER, "delete")
    ids = [fake.add_message(USER, mime(n)) for n in range(3)]
    http = HttpClient(reactor, timeout=10)
    sink = MemorySink()
    providers = oauth.Providers(reactor, http, oauth.RefreshTokenStore.in_dir(str(tmp_path)))
    ctx = SourceContext(reactor, sink, graph.GraphShared(http, graphapi.Gates(reactor)),
                        lambda a: oauth.for_account(a, providers))
    try:
        result = yield graph.build(account, ctx).poll()
    finally:
        yield http.close()
        yield port.stopListening()
    assert result.kind is None, result.message
    assert sorted(m.id for m in sink.entries) == sorted(ids)
    # mail_room's delete_after_delivery: Graph's DELETE (to Deleted Items)
    assert [m.id for m in fake.messages_in(USER, "deleteditems")] == ids
    assert tokens.requests[0]["scope"] == base + "/.default"
