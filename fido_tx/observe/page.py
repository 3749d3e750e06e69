"""The status page: ``/`` (all accounts) and ``/account/<id>`` (one account).

Server-rendered by twisted.web from a
:class:`~fido_tx.observe.view.StatusView`; no JavaScript.  ``/`` takes
``?state=`` (``failing``, ``ok``, ``new`` or an error kind), ``?q=`` (part
of an account id) and ``?page=`` (100 accounts a page).  The account page
reads the account's recent sessions from Redis (one ``LRANGE``).

:class:`BasicAuth` puts HTTP basic authentication in front of a resource
(``[http] username`` / ``password_file``); the site uses it for these two
pages only (see :func:`fido_tx.observe.web.make_site`).
"""

import hmac
from base64 import b64decode
from urllib.parse import quote, urlencode

from twisted.logger import Logger
from twisted.web import resource, server

from fido_tx.observe.html import chart, document, esc, when
from fido_tx.observe.view import FAILING, NEW, OK

log = Logger(namespace="fido_tx.observe.page")

RECENT = 50


def _arg(request, name, default=""):
    values = request.args.get(name.encode("ascii"))
    if not values:
        return default
    return values[0].decode("utf-8", "replace")


def _int_arg(request, name, default):
    try:
        return int(_arg(request, name, str(default)))
    except ValueError:
        return default


def _headers(request):
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Content-Security-Policy",
                      b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self'")


def _state_badge(state):
    css = "s-ok" if state == OK else "s-new" if state == NEW else "s-bad"
    label = "not run yet" if state == NEW else state
    return f'<span class="state {css}">{esc(label)}</span>'


def _href(**params):
    params = {k: v for k, v in params.items() if v not in ("", None, 1)}
    return "/?" + urlencode(params) if params else "/"


def account_href(account_id):
    return "/account/" + quote(account_id, safe="")


class StatusPage(resource.Resource):
    """``/``: the summary, the chart, the instances and the accounts."""

    isLeaf = True

    def __init__(self, view):
        super().__init__()
        self.view = view

    def render_GET(self, request):
        _headers(request)
        state = _arg(request, "state")
        query = _arg(request, "q")
        page = self.view.page(state, query, _int_arg(request, "page", 1))
        now = self.view.now()
        body = "".join([
            self._problems(),
            self._cards(page, now),
            self._filters(page, state, query),
            self._table(page, now),
            self._pager(page, state, query),
        ])
        return document("Fido status", body, self._subtitle(page))

    def _subtitle(self, page):
        total = sum(page.counts.values())
        redis = "Redis connected" if self.view.redis_connected() else "Redis DISCONNECTED"
        return esc(f"{total} accounts · {redis}")

    def _problems(self):
        return "".join(
            f'<div class="problem"><b>{esc(kind)}</b>: {esc(message)} '
            f'<span class="mute">since {when(since, self.view.now())}</span></div>'
            for kind, message, since in self.view.global_problems().values()
        )

    def _cards(self, page, now):
        counts = page.counts
        failing = sum(n for s, n in counts.items() if s not in (OK, NEW))
        series = self.view.per_minute()
        hour = sum(n for _t, n in series)
        backlog = self.view.backlog()
        instances = self.view.alive()
        rows = "".join(
            f"<tr><td class=\"id\">{esc(i.get('id'))}</td>"
            f"<td data-label=\"Accounts\" class=\"num\">{esc(i.get('accounts', ''))}</td>"
            f"<td data-label=\"Sessions\" class=\"num\">{esc(i.get('sessions', ''))}</td>"
            f"<td data-label=\"Version\">{esc(i.get('version', ''))}</td></tr>"
            for i in instances
        ) or '<tr><td colspan="4" class="mute">no heartbeat read yet</td></tr>'
        return (
            '<div class="cards">'
            f'<div class="card"><h2>Accounts</h2><div class="big">'
            f'<span style="color:var(--bad)">{failing}</span> failing</div>'
            f'<div class="mute">{counts.get(OK, 0)} ok · {counts.get(NEW, 0)} not run yet · '
            f"{sum(counts.values())} in all</div></div>"
            f'<div class="card"><h2>Messages per minute, last hour</h2>{chart(series)}'
            f'<div class="mute">{hour} messages this hour · stream backlog: '
            f'{esc("unknown" if backlog is None else backlog)}</div></div>'
            f'<div class="card"><h2>Instances alive ({len(instances)})</h2>'
            '<table><thead><tr><th>Instance</th><th>Accounts</th><th>Sessions</th>'
            f"<th>Version</th></tr></thead><tbody>{rows}</tbody></table></div>"
            "</div>"
        )

    def _filters(self, page, state, query):
        counts = page.counts
        failing = sum(n for s, n in counts.items() if s not in (OK, NEW))
        chips = [("", "All", sum(counts.values())), (FAILING, "Failing", failing)]
        chips += [(s, s, n) for s, n in sorted(counts.items()) if s not in (OK, NEW)]
        chips += [(OK, "OK", counts.get(OK, 0)), (NEW, "Not run yet", counts.get(NEW, 0))]
        links = "".join(
            f'<a class="chip{" on" if s == state else ""}'
            f'{" bad" if s not in ("", OK, NEW) and n else ""}" '
            f'href="{esc(_href(state=s, q=query))}">{esc(label)} {n}</a>'
            for s, label, n in chips
        )
        search = (
            '<form class="search" method="get" action="/">'
            f'<input type="hidden" name="state" value="{esc(state)}">'
            f'<input type="search" name="q" value="{esc(query)}" placeholder="account id">'
            "<button>Find</button></form>"
        )
        return f'<div class="filters">{links}{search}</div>'

    def _table(self, page, now):
        head = (
            "<thead><tr><th>Account</th><th>State</th><th>Source → delivery</th>"
            "<th>Connection</th><th>Last success</th><th>Failing since</th>"
            "<th>Last error</th><th>Fetched</th></tr></thead>"
        )
        rows = "".join(self._row(r, now) for r in page.rows)
        if not rows:
            rows = '<tr><td colspan="8" class="mute">no account matches</td></tr>'
        return f"<table>{head}<tbody>{rows}</tbody></table>"

    @staticmethod
    def _row(r, now):
        error = esc(r.last_error) if r.failing else (
            f'<span class="mute">{esc(r.last_error)}</span>' if r.last_error else "")
        return (
            f'<tr class="{"failing" if r.failing else ""}">'
            f'<td class="id"><a href="{esc(account_href(r.id))}">{esc(r.id)}</a></td>'
            f'<td data-label="State">{_state_badge(r.state)}</td>'
            f'<td data-label="Source">{esc(r.source)} → {esc(r.delivery)}</td>'
            f'<td data-label="Connection">{esc(r.connection)}</td>'
            f'<td data-label="Last success">{when(r.last_success_at, now)}</td>'
            f'<td data-label="Failing since">'
            f'{when(r.failing_since, now) if r.failing_since else ""}</td>'
            f'<td data-label="Last error" class="{"err" if r.failing else ""}">{error}</td>'
            f'<td data-label="Fetched" class="num">{r.fetched_total}</td></tr>'
        )

    @staticmethod
    def _pager(page, state, query):
        if page.pages <= 1:
            return f'<div class="pager mute">{page.matching} account(s)</div>'
        prev = (f'<a href="{esc(_href(state=state, q=query, page=page.page - 1))}">← previous</a>'
                if page.page > 1 else "")
        nxt = (f'<a href="{esc(_href(state=state, q=query, page=page.page + 1))}">next →</a>'
               if page.page < page.pages else "")
        return (f'<div class="pager">{prev}<span class="mute">page {page.page} of {page.pages}'
                f" · {page.matching} account(s)</span>{nxt}</div>")


class AccountPages(resource.Resource):
    """``/account/<id>``: one account and its recent sessions."""

    def __init__(self, view):
        super().__init__()
        self.view = view

    def getChild(self, path, request):
        account_id = path.decode("utf-8", "replace")
        if request.postpath:  # an id with "/" is sent %2F-encoded: twisted decodes it
            account_id = "/".join([account_id] + [
                p.decode("utf-8", "replace") for p in request.postpath])
            request.postpath = []
        return AccountPage(self.view, account_id)

    def render_GET(self, request):
        request.redirect(b"/")
        return b""


class AccountPage(resource.Resource):
    isLeaf = True

    def __init__(self, view, account_id):
        super().__init__()
        self.view = view
        self.account_id = account_id

    def render_GET(self, request):
        _headers(request)
        row = self.view.row(self.account_id)
        if row is None:
            request.setResponseCode(404)
            return document("Fido: no such account",
                            f"<p>No account <b>{esc(self.account_id)}</b> here. "
                            '<a href="/">All accounts</a></p>')
        sessions = self.view.sessions
        if sessions is None:
            return self._render(row, None, "no session history is kept")
        d = sessions.recent(self.account_id, RECENT)
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def write(page):
            if not finished:
                request.write(page)
                request.finish()

        d.addCallbacks(
            lambda recent: self._render(row, recent, ""),
            lambda f: self._render(row, None, f"recent sessions not readable: "
                                              f"{f.getErrorMessage()}"),
        ).addCallback(write).addErrback(log.failure, "account page failed")
        return server.NOT_DONE_YET

    def _render(self, row, recent, note):
        now = self.view.now()
        facts = [
            ("State", _state_badge(row.state)),
            ("Source → delivery", f"{esc(row.source)} → {esc(row.delivery)}"),
            ("Connection", esc(row.connection)),
            ("Last success", when(row.last_success_at, now)),
            ("Failing since", when(row.failing_since, now) if row.failing_since else "—"),
            ("Failures in a row", str(row.failures)),
            ("Last error", f'<span style="color:var(--bad)">{esc(row.last_error)}</span>'
             f" <span class=\"mute\">{when(row.last_error_at, now) if row.last_error_at else ''}"
             "</span>" if row.last_error else "—"),
            ("Messages fetched", str(row.fetched_total)),
        ]
        dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
        body = (f'<p><a href="/">← all accounts</a></p><div class="card"><h2 class="acct">{esc(row.id)}</h2>'
                f'<dl class="facts">{dl}</dl></div><h2>Recent sessions</h2>')
        body += self._sessions(recent, now) if recent is not None else ""
        if note:
            body += f'<p class="mute">{esc(note)}</p>'
        return document(f"Fido: {row.id}", body, esc(row.id))

    @staticmethod
    def _sessions(recent, now):
        if not recent:
            return '<p class="mute">no session recorded yet</p>'
        rows = "".join(
            f'<tr class="{"" if s.get("kind") == OK else "failing"}">'
            f'<td data-label="When">{when(s.get("t"), now)}</td>'
            f'<td data-label="Outcome">{_state_badge(s.get("kind") or "?")}</td>'
            f'<td data-label="Fetched" class="num">{esc(s.get("fetched", 0))}</td>'
            f'<td data-label="Bytes" class="num">{esc(s.get("bytes", 0))}</td>'
            f'<td data-label="Seconds" class="num">{esc(s.get("seconds", ""))}</td>'
            f'<td data-label="Error" class="err">{esc(s.get("error", ""))}</td></tr>'
            for s in recent
        )
        return ("<table><thead><tr><th>When</th><th>Outcome</th><th>Fetched</th><th>Bytes</th>"
                f"<th>Seconds</th><th>Error</th></tr></thead><tbody>{rows}</tbody></table>")


class _Unauthorized(resource.Resource):
    isLeaf = True

    def __init__(self, realm):
        super().__init__()
        self.realm = realm

    def render(self, request):
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", b'Basic realm="%s", charset="UTF-8"' % self.realm)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"401: the Fido status page needs a user name and password\n"


class BasicAuth(resource.Resource):
    """HTTP basic authentication in front of ``wrapped`` (constant-time compare)."""

    def __init__(self, wrapped, username, password, realm=b"Fido"):
        super().__init__()
        self._wrapped = wrapped
        self._expected = (username.encode("utf-8"), password.encode("utf-8"))
        self._realm = realm

    def allowed(self, request):
        header = request.getHeader(b"authorization") or b""
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = b64decode(value.strip(), validate=True).partition(b":")
        except ValueError:
            return False
        good_user = hmac.compare_digest(user, self._expected[0])
        good_password = hmac.compare_digest(password, self._expected[1])
        return bool(sep) and good_user and good_password

    def getChildWithDefault(self, path, request):
        if not self.allowed(request):
            return _Unauthorized(self._realm)
        request.postpath.insert(0, request.prepath.pop())
        return self._wrapped

    def render(self, request):
        if not self.allowed(request):
            return _Unauthorized(self._realm).render(request)
        return self._wrapped.render(request)
