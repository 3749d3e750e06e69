"""``fido check --connect`` for Microsoft Graph accounts, over loopback against
the fake token endpoint and the fake Graph service."""

import attr
import pytest_twisted
from twisted.internet import reactor

from fido_tx.cmd import check
from fido_tx.config import ImapSettings
from fido_tx.credentials import oauth
from tests.test_graph import mime
from tests.test_graph_loopback import SECRET, USER, Loopback


@pytest_twisted.inlineCallbacks
def test_check_connect_reads_only_and_names_a_missing_folder(tmp_path):
    lo = Loopback(tmp_path)
    try:
        for n in range(3):
            lo.graph.add_message(USER, mime(n))
        good = lo.account
        missing = attr.evolve(good, id="contoso-missing", mailbox="No Such Folder")
        results = yield check.check_accounts(
            reactor, [good, missing], ImapSettings(), concurrency=2, timeout=10,
            graph_check=check.graph_checker(str(tmp_path), timeout=10))
        yield oauth.close_shared()
    finally:
        yield lo.close()
    [(_, ok), (_, bad)] = results
    assert ok.ok and ok.dry_run, ok
    assert check.result_text(ok) == "ok: 3 unseen"
    assert bad.kind == "mailbox" and "No Such Folder" in bad.message, bad
    # read-only: nothing marked, nothing downloaded
    assert {method for _, method, *_ in lo.graph.log} == {"GET"}
    assert not any(path.endswith("$value") for _, _, path, *_ in lo.graph.log)
    assert all(not m.is_read for m in lo.graph.messages_in(USER))
    table = "\n".join(check.format_results(results))
    assert "127.0.0.1 " + USER in table and "https" in table
    assert SECRET not in table and not any(t in table for t in lo.tokens.issued)
