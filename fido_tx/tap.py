"""The twistd entry point: ``twistd fido [--config PATH] [--dry-run]``."""

import gc

from twisted.python import usage


class Options(usage.Options):
    synopsis = "[--config PATH] [--dry-run]"
    longdesc = (
        "Fetch new mail from the IMAP accounts in the accounts file into a "
        "Redis stream, exactly once, then mark it on the server.  Without "
        "--config, fido.toml is looked for in $FIDO_CONFIG, /etc/fido, the "
        "web application's deploy directories and ~/.config/fido; when none "
        "exists a commented default is written and used."
    )
    optParameters = [
        ["config", "c", None, "Path of fido.toml."],
    ]
    optFlags = [
        ["dry-run", None, "Change neither the mailboxes nor Redis; log what would happen."],
    ]


def makeService(options):
    """Load the configuration and build the daemon's service tree."""
    from fido_tx import config, private

    try:
        settings, path, created = config.load_settings(
            options["config"], dry_run=True if options["dry-run"] else None
        )
    except config.ConfigError as e:
        # twistd turns a SystemExit message into one line on stderr, no traceback.
        raise SystemExit(f"fido: {e}")
    # twistd has not imported the reactor yet: import it (and the endpoints
    # and txredisapi) without pyOpenSSL, which loads on the first TLS
    # connection (~12 MiB less for a daemon without TLS)
    private.import_twisted(tls=config.uses_tls(settings.http.listen))
    from twisted.internet import reactor

    from fido_tx import service
    from fido_tx.accounts.reload import AccountsStartupError
    from fido_tx.errors import OneLineError

    twistd = getattr(options, "parent", None) or {}
    try:
        top = service.make_service(
            settings,
            reactor,
            created_config=created,
            twistd_logfile=twistd.get("logfile") or "",
            twistd_syslog=bool(twistd.get("syslog")),
            handle_signals=True,
        )
    except (AccountsStartupError, service.StartupError) as e:
        raise SystemExit(f"fido: {e}")
    except OneLineError as e:  # [http] listen unusable, and others of one line
        raise SystemExit(f"fido: {e}")
    settle_collector(tls=top.parts["tls"].loaded)
    return top


#: ``gc.set_threshold`` once running: a young collection per 10,000 new
#: container objects instead of CPython's 700.  A session's objects (its
#: coroutines, Deferreds, protocol, parsed answers) are freed by reference
#: counting when it ends; at 700 the young collections walked the objects
#: of the 16-64 sessions in flight and promoted them, ~2 young collections
#: per empty session.  Measured (bench/compare.py, fido_run.py's gc_total_ms,
#: plain, W16, 1,000 accounts, reconnecting polls): collector time once
#: running 429 -> 68 ms for 1000x5 (136 -> 6 collections, ~4 % of the CPU),
#: 194 -> 33 ms for the empty poll (127 -> 5, ~4 %), peak RSS unchanged.
GC_THRESHOLD = (10_000, 10, 10)

#: the same for a daemon that uses TLS (:mod:`fido_tx.tlspreload` loaded it
#: at start-up): a closed TLS connection's OpenSSL state is freed only when
#: the collector reaches its Python objects, so at 10,000 the peak RSS of a
#: TLS 100x20 run (W16, bench/compare.py) was 74.8-78.0 MiB against
#: 70.1-72.1 at 2,000 and 67.1-72.2 at CPython's 700 (one run each, the
#: 2026-11-29 evening); at 10,000 it was even with 25d878a's (80.4 against
#: 78.4, medians of 3).  2,000 still collects ~3 times less often than 700.
#: A daemon whose first TLS account comes with a reload keeps the other.
GC_THRESHOLD_TLS = (2_000, 10, 10)


def settle_collector(tls=False):
    """Freeze what start-up built and space the young collections out
    (less far when the daemon uses TLS: :data:`GC_THRESHOLD_TLS`)."""
    threshold = GC_THRESHOLD_TLS if tls else GC_THRESHOLD
    # Everything imported and built so far lives as long as the process:
    # keep it out of the garbage collector's full passes, which otherwise
    # walk it again and again (one pause 146 -> 113 ms at 3,000 sessions).
    # The young generations only are collected first: a full collection here
    # found no garbage (0 objects, 1,000 accounts, plain or TLS) and cost
    # 46-52 ms of the start-up's CPU walking the ~47,000 objects start-up
    # made; the young ones cost 1.5 ms (issue 15, bench/README "Start-up").
    gc.collect(1)
    gc.freeze()
    gc.set_threshold(*threshold)
