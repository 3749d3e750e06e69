"""``fido check``: validate ``fido.toml`` and the accounts file; with
``--connect``, log in to every account read-only.

Without ``--connect`` it reads the config (never writing a default one: that
is ``fido init``'s job), loads the accounts file with the key file, and
prints each dropped entry (account id, field, message), warnings (secrets
readable by group or others) and notes (accounts of other shards, no
reporter), then one summary line::

    fido.toml OK: 40 accounts (20 in this shard), 1 problem

With ``--connect`` it then runs a dry-run session (EXAMINE, UID SEARCH,
sizes; nothing fetched, stored, flagged or moved) on every account of this
instance's shard, ``--concurrency`` at a time, and prints a table::

    ACCOUNT       SERVER                 SECURITY  RESULT                         SECONDS
    acme-support  imap.example.com:993   tls       ok: 12 unseen                  0.41
    acme-billing  imap.example.com:993   tls       auth: LOGIN rejected: ...      0.38

``--json`` prints one JSON document instead (see :func:`document`).  Exit
status: 0 when everything is fine, 1 when the accounts file has problems or
an account failed, 1 with one line on stderr when the config or the accounts
file cannot be used at all.  No password or token is ever printed.
"""

import argparse
import json
import os
import sys

import attr
from twisted.internet import defer
from zope.interface import implementer

from fido_tx.interfaces import ISink
from fido_tx.accounts import model as accounts_mod
from fido_tx import config
from fido_tx import errors
from fido_tx.outcome import SessionResult

DEFAULT_CONCURRENCY = 20
#: seconds one account may take, and the cap on each network step
DEFAULT_TIMEOUT = 30.0
MESSAGE_WIDTH = 72
BAR_WIDTH = 20


class CheckError(Exception):
    """A one-line failure of ``fido check`` (config or accounts unusable)."""


# -- the static check ------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Report:
    """What the static check found."""

    config_path: str
    accounts_file: str
    key_file: str
    shard: str
    #: the valid accounts (all shards)
    accounts: tuple = ()
    #: the valid accounts of this instance's shard
    shard_accounts: tuple = ()
    #: :class:`fido_tx.accounts.model.Problem` per dropped entry
    problems: tuple = ()
    warnings: tuple = ()
    notes: tuple = ()
    #: one line each: what the daemon would refuse at start ([log] file)
    startup_problems: tuple = ()

    @property
    def ok(self):
        return not self.problems and not self.startup_problems


def _plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _config_secrets(settings):
    found = []
    if settings.reporter.token:
        found.append("[reporter] token")
    try:
        from fido_tx.redis import url as redisurl

        if redisurl.parse(settings.redis.url).password:
            found.append("a Redis password")
    except Exception:  # validated at load time; never fail the check on it
        pass
    return found


def inspect(settings, config_path):
    """Load the accounts file of ``settings`` -> :class:`Report`.

    :raises fido_tx.accounts.model.AccountsFileError: the file is unusable.
    """
    fido = settings.fido
    loaded = accounts_mod.load_accounts(fido.accounts_file, fido.key_file)
    shard_accounts = tuple(a for a in loaded.accounts if accounts_mod.in_shard(a.id, fido.shard))
    warnings, notes = [], []
    if fido.key_file:
        if accounts_mod.insecure_permissions(fido.key_file):
            warnings.append(f"{fido.key_file} (key file) is readable by group or others;"
                            " chmod 600 it")
    elif accounts_mod.insecure_permissions(fido.accounts_file):
        warnings.append(f"{fido.accounts_file} holds passwords in plain JSON and is readable"
                        " by group or others; chmod 600 it (or encrypt it: fido keygen,"
                        " fido encrypt)")
    secrets = _config_secrets(settings)
    if secrets and accounts_mod.insecure_permissions(config_path):
        warnings.append(f"{config_path} holds {' and '.join(secrets)} and is readable by"
                        " group or others; chmod 600 it")
    others = len(loaded.accounts) - len(shard_accounts)
    if others:
        notes.append(f"{_plural(others, 'account')} belong to other shards (this instance is"
                     f" shard {fido.shard}) and are not fetched here")
    if not settings.reporter.url:
        notes.append("[reporter] url is empty: account errors are not reported to the web"
                     " application")
    if fido.dry_run:
        notes.append("dry_run = true: the daemon changes neither mailboxes nor Redis")
    tracked = [a for a in shard_accounts if a.source == "imap" and mode(a)]
    if tracked:
        notes.append(f"{_plural(len(tracked), 'IMAP account')} with select = \"new\" or"
                     " start_from = \"now\" (shown per account with --connect, which reads"
                     " no position from Redis: it counts from UID 1, and start_from = \"now\""
                     " counts nothing)")
    startup, more_warnings = startup_checks(settings)
    warnings.extend(more_warnings)
    return Report(
        config_path=config_path,
        accounts_file=fido.accounts_file,
        key_file=fido.key_file,
        shard=fido.shard,
        accounts=loaded.accounts,
        shard_accounts=shard_accounts,
        problems=loaded.problems,
        warnings=tuple(warnings),
        notes=tuple(notes),
        startup_problems=tuple(startup),
    )


def startup_checks(settings):
    """What the daemon would refuse at start, or warn about, beyond the
    config file's own validation: ``(problems, warnings)``, one line each.

    - ``[log] file`` that cannot be opened for appending: a problem;
    - ``[http] listen`` on a port already in use: a warning (it may be the
      running daemon's own port);
    - ``[http] listen`` beyond loopback: a warning (no authentication).
    """
    problems, warnings = [], []
    why = log_file_problem(settings.log.file)
    if why:
        problems.append(f"[log] file {settings.log.file}: {why}")
    address = tcp_listen_address(settings.http.listen)
    if address is not None:
        host, port = address
        in_use = port_in_use(host, port)
        if in_use:
            warnings.append(f"[http] listen {settings.http.listen!r}: {in_use} (the daemon "
                            "would not start, unless it is this one already running)")
        if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
            warnings.append(f"[http] listen {settings.http.listen!r} listens beyond loopback:"
                            " /metrics and /healthz have no authentication")
    return problems, warnings


def log_file_problem(path):
    """Why ``path`` cannot be opened for appending (one line), or ``None``."""
    import os

    if not path:
        return None
    if os.path.isdir(path):
        return "is a directory; name a file in it"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "cannot be written (permissions)"
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(directory):  # the daemon creates missing directories
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create it in {directory} (permissions)"
    return None


def tcp_listen_address(description):
    """``(host, port)`` of a ``tcp:``/``tcp6:`` endpoint description, or ``None``."""
    if not description:
        return None
    parts = description.replace("\\:", "\0").split(":")
    parts = [p.replace("\0", ":") for p in parts]
    kind = parts[0].lower()
    if kind in ("tcp", "tcp6"):
        parts = parts[1:]
    elif not kind.isdigit():
        return None
    try:
        port = int(parts[0])
    except (IndexError, ValueError):
        return None
    host = "::" if kind == "tcp6" else "0.0.0.0"
    for option in parts[1:]:
        if option.startswith("interface="):
            host = option[len("interface="):]
    return host, port


def port_in_use(host, port):
    """A one-line reason when ``host:port`` cannot be bound now, else ``None``."""
    import socket

    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return f"cannot create a socket: {e.strerror or e}"
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does
        sock.bind((host, port))
    except OSError as e:
        return f"cannot listen on {host}:{port}: {e.strerror or e}"
    finally:
        sock.close()
    return None


def summary_line(report):
    return (f"fido.toml OK: {_plural(len(report.accounts), 'account')}"
            f" ({len(report.shard_accounts)} in this shard),"
            f" {_plural(len(report.problems) + len(report.startup_problems), 'problem')}")


def format_report(report):
    """The static check as lines for a terminal."""
    how = f"encrypted, key file {report.key_file}" if report.key_file else "plain JSON"
    lines = [f"config: {report.config_path}", f"accounts file: {report.accounts_file} ({how})"]
    lines += [f"problem: {p}" for p in report.problems]
    lines += [f"problem: {p}" for p in report.startup_problems]
    lines += [f"warning: {w}" for w in report.warnings]
    lines += [f"note: {n}" for n in report.notes]
    lines.append(summary_line(report))
    return lines


# -- connecting ------------------------------------------------------------------


@implementer(ISink)
class _NullSink:
    """A sink for dry runs: every message is new, nothing is ever delivered."""

    kind = "null"

    def filter_new(self, account_id, mailbox, epoch, ids):
        return defer.succeed(list(ids))

    def identities(self, account_id, mailbox, epoch, ids):
        return defer.succeed(["" for _ in ids])

    def may_recognise(self, account_id, mailbox, epoch):
        return False

    def recognise(self, account_id, mailbox, epoch, identities):
        return defer.succeed([])

    def deliver(self, messages):  # a dry run never delivers
        return defer.fail(errors.FidoError(errors.CONFIG, "fido check delivers nothing"))


def capped_settings(imap_settings, timeout):
    """``imap_settings`` with every network timeout at most ``timeout``."""
    if not timeout:
        return imap_settings
    return attr.evolve(
        imap_settings,
        connect_timeout=min(imap_settings.connect_timeout, timeout),
        greeting_timeout=min(imap_settings.greeting_timeout, timeout),
        command_timeout=min(imap_settings.command_timeout, timeout),
        logout_timeout=min(imap_settings.logout_timeout, timeout),
    )


def _scrub(account, result):
    """Belt and braces: the session redacts already; make sure."""
    from fido_tx.scrub import scrub, secret_forms

    forms = secret_forms(account.password, account.username)
    message, debug = scrub(result.message, forms), scrub(result.debug, forms)
    if message != result.message or debug != result.debug:
        return attr.evolve(result, message=message, debug=debug)
    return result


def graph_checker(state_dir, key_file="", timeout=DEFAULT_TIMEOUT):
    """``f(reactor, account) -> Deferred[SessionResult]`` checking Graph accounts
    (a token from the shared providers, which keep rotated refresh tokens in
    ``state_dir``; the folder; its unread count)."""

    def check(reactor, account):
        from fido_tx.credentials import oauth
        from fido_tx.sources import graph

        shared = graph.GraphShared.create(reactor, timeout=timeout or 60.0)
        try:
            credentials = oauth.for_account(
                account, oauth.shared_providers(reactor, state_dir, key_file))
        except ValueError as e:
            return defer.succeed(SessionResult(account.id, kind=errors.CONFIG, message=str(e),
                                               dry_run=True))
        d = graph.check_account(reactor, account, shared, credentials)

        def close(result):
            return shared.close().addBoth(lambda _: result)

        return d.addBoth(close)

    return check


def check_accounts(reactor, accounts, imap_settings, concurrency=DEFAULT_CONCURRENCY,
                   progress=None, timeout=DEFAULT_TIMEOUT, fetch=None, graph_check=None,
                   state_dir="", key_file=""):
    """Log in to each account read-only (a dry-run session), ``concurrency`` at a time.

    :param reactor: IReactorTCP + IReactorTime (+ name resolver).
    :param accounts: :class:`fido_tx.accounts.model.Account` values.
    :param imap_settings: :class:`fido_tx.config.ImapSettings`; its timeouts
        are capped at ``timeout``.
    :param progress: ``progress(done, total)``, called with 0 first and after
        each account.
    :param timeout: seconds one account may take in all (``None``: no cap
        beyond the settings' own timeouts); then its result is a ``timeout``.
    :param fetch: ``fetch_mailbox``'s signature (tests); the real one by default.
    :param graph_check: ``f(reactor, account)`` for ``source = "graph"``
        accounts (:func:`graph_checker`); by default one keeping rotated
        refresh tokens in the current directory.
    :return: Deferred firing with ``[(account, SessionResult), ...]`` in the
        order given; it never errbacks.
    """
    if fetch is None:
        fetch = _imap_fetch(reactor)
    accounts = list(accounts)
    settings = capped_settings(imap_settings, timeout)
    sink = _NullSink()
    if graph_check is None:
        graph_check = graph_checker("", timeout=timeout)

    def start(account):
        if account.source == "graph":
            return graph_check(reactor, account)
        return fetch(reactor, account, sink, settings, dry_run=True,
                     **_imap_credentials(reactor, account, state_dir, key_file))

    semaphore = defer.DeferredSemaphore(max(1, int(concurrency)))
    total = len(accounts)
    done = [0]
    if progress is not None:
        progress(0, total)

    def one(account):
        def finished(result):
            done[0] += 1
            if progress is not None:
                progress(done[0], total)
            return (account, _scrub(account, result))

        return _check_one(reactor, account, start, timeout).addCallback(finished)

    return defer.gatherResults([semaphore.run(one, a) for a in accounts])


def _imap_fetch(reactor):
    """The real dry-run IMAP session, with one Connector for all accounts
    (TLS options built once per server, not per account)."""
    import functools

    from fido_tx.sources.imap.connect import Connector
    from fido_tx.sources.imap.session import fetch_mailbox

    return functools.partial(fetch_mailbox, connector=Connector(reactor))


def _imap_credentials(reactor, account, state_dir, key_file):
    """``credentials=`` for an OAuth2 IMAP account: tokens from the shared
    providers (rotated refresh tokens kept in ``state_dir``); else nothing."""
    if account.auth not in accounts_mod.OAUTH_AUTHS:
        return {}
    from fido_tx.credentials import CredentialsContext, for_account

    return {"credentials": for_account(account, CredentialsContext(
        reactor=reactor, state_dir=state_dir, key_file=key_file))}


def _check_one(reactor, account, start, timeout):
    """``start(account)`` as a Deferred[SessionResult] that never errbacks:
    past ``timeout`` seconds it is a ``timeout`` result, an unexpected error
    a ``protocol`` one."""
    started = reactor.seconds()

    def elapsed():
        return max(0.0, reactor.seconds() - started)

    d = defer.maybeDeferred(start, account)
    if timeout:
        d.addTimeout(timeout, reactor, onTimeoutCancel=lambda _result, _t: SessionResult(
            account.id, kind=errors.TIMEOUT, message=f"no result within {timeout:g} s",
            seconds=elapsed(), dry_run=True))
    d.addErrback(lambda f: SessionResult(
        account.id, kind=errors.PROTOCOL,
        message=f"unexpected error: {f.type.__name__}: {f.getErrorMessage()}",
        seconds=elapsed(), dry_run=True))
    return d


def _one_line(text, width=MESSAGE_WIDTH):
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def unseen(result):
    """Unseen messages a dry run found (over-size ones included)."""
    return result.fetched + len(result.too_large)


def mode(account):
    """An account's non-default ``select`` / ``start_from``, e.g. ``select new,
    start_from now`` (``""`` for the defaults)."""
    if account is None:
        return ""
    parts = [f"select {account.select}"] if account.select != "unseen" else []
    if account.start_from != "all":
        parts.append(f"start_from {account.start_from}")
    return ", ".join(parts)


def result_text(result, width=MESSAGE_WIDTH, account=None):
    if result.ok:
        what = "new" if account is not None and account.select == "new" else "unseen"
        text = f"ok: {unseen(result)} {what}"
        if result.too_large:
            text += f" ({len(result.too_large)} over max_message_size)"
        if mode(account):
            text += f" ({mode(account)})"
        return text
    return f"{result.kind}: {_one_line(result.message, width)}"


def _table(headers, rows):
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in [headers] + rows]


def _by_kind(results):
    kinds = {}
    for _account, result in results:
        if not result.ok:
            kinds[result.kind] = kinds.get(result.kind, 0) + 1
    return dict(sorted(kinds.items()))


def _server(account):
    if account.source == "graph":
        from urllib.parse import urlsplit

        return f"{urlsplit(account.graph_endpoint).hostname} {account.user}"
    return f"{account.host}:{account.port}"


def _security(account):
    return "https" if account.source == "graph" else account.security


def format_results(results):
    """The ``--connect`` table and its summary line."""
    if not results:
        return ["checked 0 accounts: none in this shard"]
    lines = _table(
        ["ACCOUNT", "SERVER", "SECURITY", "RESULT", "SECONDS"],
        [[a.id, _server(a), _security(a), result_text(r, account=a), f"{r.seconds:.2f}"]
         for a, r in results],
    )
    kinds = _by_kind(results)
    failed = sum(kinds.values())
    line = f"checked {_plural(len(results), 'account')}: {len(results) - failed} ok"
    if failed:
        line += f", {failed} failed (" + ", ".join(f"{k} {n}" for k, n in kinds.items()) + ")"
    return lines + ["", line]


def document(report, results=None):
    """The ``--json`` document::

        {"config": ..., "accounts_file": ..., "key_file": ... ("" = plain), "shard": "1/1",
         "accounts": 40, "in_shard": 20,
         "problems": [{"account": ... or null, "index": 3, "field": ..., "message": ...}],
         "warnings": [...], "notes": [...],
         "connect": null, or {"ok": 19, "failed": 1, "by_kind": {"auth": 1},
                              "accounts": [{"id", "host", "port", "security", "ok",
                                            "unseen", "select", "start_from",
                                            "too_large", "kind", "message",
                                            "seconds"}, ...]},
         "ok": true}
    """
    doc = {
        "config": report.config_path,
        "accounts_file": report.accounts_file,
        "key_file": report.key_file,
        "shard": report.shard,
        "accounts": len(report.accounts),
        "in_shard": len(report.shard_accounts),
        "problems": [{"account": p.account_id, "index": p.index, "field": p.field,
                      "message": p.message} for p in report.problems],
        "startup_problems": list(report.startup_problems),
        "warnings": list(report.warnings),
        "notes": list(report.notes),
        "connect": None,
    }
    ok = report.ok
    if results is not None:
        kinds = _by_kind(results)
        failed = sum(kinds.values())
        ok = ok and not failed
        doc["connect"] = {
            "ok": len(results) - failed,
            "failed": failed,
            "by_kind": kinds,
            "accounts": [
                {"id": a.id, "host": a.host, "port": a.port, "security": a.security,
                 "ok": r.ok, "unseen": unseen(r) if r.ok else None,
                 "select": a.select, "start_from": a.start_from,
                 "too_large": len(r.too_large), "kind": r.kind,
                 "message": " ".join(r.message.split()), "seconds": round(r.seconds, 3)}
                for a, r in results
            ],
        }
    doc["ok"] = ok
    return doc


class ProgressBar:
    """``checking 12/40 [######..............]`` redrawn in place with ``\\r``."""

    def __init__(self, stream, width=BAR_WIDTH):
        self.stream = stream
        self.width = width
        self._shown = 0

    def __call__(self, done, total):
        filled = self.width * done // total if total else self.width
        text = f"checking {done}/{total} [{'#' * filled}{'.' * (self.width - filled)}]"
        self.stream.write("\r" + text.ljust(self._shown))
        self.stream.flush()
        self._shown = len(text)

    def clear(self):
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0


def _isatty(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _connect_with_global_reactor(accounts, imap_settings, concurrency, timeout, progress,
                                 graph_check=None, state_dir="", key_file=""):
    """:func:`check_accounts` under ``task.react``; ``None`` when interrupted."""
    from twisted.internet import task
    from twisted.python.failure import Failure

    box = []

    def go(reactor):
        from fido_tx.credentials import oauth

        d = check_accounts(reactor, accounts, imap_settings, concurrency, progress, timeout,
                           graph_check=graph_check, state_dir=state_dir, key_file=key_file)
        d.addBoth(box.append)
        d.addBoth(lambda _: oauth.close_shared())
        return d

    try:
        task.react(go)
    except SystemExit:
        pass
    if not box:
        return None
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


# -- the command -------------------------------------------------------------------


def _positive(kind, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{what} must be more than 0, got {text!r}")
        return value

    return parse


def add_arguments(parser):
    parser.add_argument(
        "--connect", action="store_true",
        help="also log in to every account of this shard read-only (EXAMINE; nothing is "
        "fetched, stored or marked) and show the result per account",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of text"
    )
    parser.add_argument(
        "--concurrency", metavar="N", type=_positive(int, "--concurrency"),
        default=DEFAULT_CONCURRENCY,
        help=f"accounts checked at once with --connect (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--timeout", metavar="S", type=_positive(float, "--timeout"), default=DEFAULT_TIMEOUT,
        help=f"seconds one account may take with --connect (default {DEFAULT_TIMEOUT:g})",
    )


def load(args):
    """``(settings, path)`` of ``fido.toml`` (found as the daemon finds it, never created).

    :raises CheckError: no config file; :raises config.ConfigError: bad one.
    """
    roots = getattr(args, "roots", None) or config.Roots()
    environ = getattr(args, "environ", None)
    if environ is None:
        import os

        environ = os.environ
    path = config.find_config(getattr(args, "config", None), environ, roots)
    if path is None:
        raise CheckError("no fido.toml found (looked in " + ", ".join(roots.search_path())
                         + "); write one with fido init")
    return config.read_settings(path), path


def main(args):
    """Run ``fido check``; returns the exit status.

    ``args``: ``config``, ``connect``, ``json``, ``concurrency``, ``timeout``
    and the ``stdout``/``stderr``/``environ``/``roots`` conveniences of
    :mod:`fido_tx.cmd.cli` (optional).
    """
    out = getattr(args, "stdout", None) or sys.stdout
    err = getattr(args, "stderr", None) or sys.stderr
    as_json = getattr(args, "json", False)
    try:
        settings, path = load(args)
        report = inspect(settings, path)
    except (CheckError, config.ConfigError, accounts_mod.AccountsFileError) as e:
        err.write(f"fido: error: {' '.join(str(e).split())}\n")
        err.flush()
        return 1
    if not as_json:
        out.write("\n".join(format_report(report)) + "\n")
        out.flush()
    results = None
    if getattr(args, "connect", False):
        progress = None
        if not as_json and _isatty(out) and report.shard_accounts:
            progress = ProgressBar(out)
        if not as_json:
            out.write("\n")
        results = _connect_with_global_reactor(
            report.shard_accounts, settings.imap,
            getattr(args, "concurrency", DEFAULT_CONCURRENCY),
            getattr(args, "timeout", DEFAULT_TIMEOUT), progress,
            graph_checker(settings.fido.state_dir
                          or os.path.dirname(settings.fido.accounts_file),
                          settings.fido.key_file, getattr(args, "timeout", DEFAULT_TIMEOUT)),
            state_dir=settings.fido.state_dir or os.path.dirname(settings.fido.accounts_file),
            key_file=settings.fido.key_file,
        )
        if progress is not None:
            progress.clear()
        if results is None:
            err.write("fido: error: interrupted\n")
            return 130
        if not as_json:
            out.write("\n".join(format_results(results)) + "\n")
    if as_json:
        doc = document(report, results)
        out.write(json.dumps(doc, indent=2) + "\n")
        out.flush()
        return 0 if doc["ok"] else 1
    out.flush()
    failed = results is not None and any(not r.ok for _a, r in results)
    return 1 if (not report.ok or failed) else 0
