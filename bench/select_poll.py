"""What ``select = "new"`` / ``start_from = "now"`` cost on an empty poll:
client CPU per poll of the same Dovecot mailbox in the three modes, taken in
turn within one run (a real Redis holds the positions).

    .venv/bin/python bench/select_poll.py --polls 400
"""

import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer  # noqa: E402

from fido_tx import sinks  # noqa: E402
from fido_tx.accounts.model import Account  # noqa: E402
from fido_tx.config import ImapSettings  # noqa: E402
from fido_tx.redis.positions import MailboxPositions  # noqa: E402
from fido_tx.sources.imap.connect import Connector  # noqa: E402
from fido_tx.sources.imap.session import fetch_mailbox  # noqa: E402
from tests.support import dovecot as dovecot_support, redis_server  # noqa: E402
from tests.support.dovecot import make_message  # noqa: E402
from tests.support.redisconn import shared_connection  # noqa: E402


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(reactor, dovecot, redis, polls):
    user = "bench@fido.test"
    dovecot.add_users({user: "pw"})
    for i in range(50):  # read mail: every mode finds nothing to fetch
        dovecot.add_message(user, make_message(i, 500), flags="S")
    conn = await shared_connection(reactor, redis.port)
    module = sinks.module("stream")
    sink = module.build("default", module.validate(dict(module.OPTIONS), "/"),
                        sinks.SinkContext(reactor, conn))
    positions, connector = MailboxPositions(conn), Connector(reactor)
    base = dict(id="b", host="127.0.0.1", port=dovecot.port, security="none", username=user,
                password="pw")
    modes = {"select unseen (default)": Account(**base),
             "select new": Account(**base, select="new"),
             "start_from now": Account(**base, start_from="now")}

    def poll(account):
        return fetch_mailbox(reactor, account, sink, ImapSettings(), positions=positions,
                             connector=connector, debug=False)

    for account in modes.values():  # warm up; records the positions
        assert (await poll(account)).ok
    spent = dict.fromkeys(modes, 0.0)
    for _ in range(polls):
        for name, account in modes.items():
            before = cpu()
            result = await poll(account)
            spent[name] += cpu() - before
            assert result.ok and result.fetched == 0, result
    for name, seconds in spent.items():
        print(f"{name:25} client CPU per empty poll {seconds / polls * 1000:.3f} ms")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=400, help="polls per mode (default 400)")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    with dovecot_support.started(tls=False) as dovecot:
        redis = redis_server.RedisServer(redis_server.find_redis_server()).start()
        try:
            d = defer.ensureDeferred(measure(reactor, dovecot, redis, args.polls))
            d.addErrback(lambda f: f.printTraceback())
            d.addBoth(lambda _: reactor.stop())
            reactor.run()
        finally:
            redis.close()


if __name__ == "__main__":
    main()
