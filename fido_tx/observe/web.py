"""``/`` (the status page), ``/healthz`` and ``/metrics`` over twisted.web.

``/`` and ``/account/<id>``: the status page (:mod:`fido_tx.observe.page`),
behind HTTP basic authentication when ``[http] username`` is set.  The
authentication does NOT cover ``/healthz`` and ``/metrics``: load balancers
and Prometheus read them, and they carry counts only (no account id, no
server text).  Keep them off the public network with ``listen``.

``/metrics``: the Prometheus text format of :class:`fido_tx.observe.metrics.Metrics`'s
own registry.

``/healthz``: ``200`` while :class:`fido_tx.observe.health.Health` says Fido is
making progress and Redis is reachable, ``503`` otherwise; the body is the
check's JSON.

The site writes no access log: a scraper every 15 s would fill the log.
"""

import json

from twisted.web import pages, resource, server

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest



class HealthResource(resource.Resource):
    isLeaf = True

    def __init__(self, health):
        super().__init__()
        self._health = health

    def render_GET(self, request):
        try:
            healthy, body = self._health.check()
        except Exception as e:  # the check itself broke: that is unhealthy
            healthy, body = False, {"status": "fail", "reason": f"health check error: {e}"}
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(body).encode("utf-8") + b"\n"

    render_HEAD = render_GET


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, metrics):
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._metrics.registry)


class _Root(resource.Resource):
    def getChild(self, path, request):
        return pages.notFound()

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"fido: see /healthz and /metrics\n"


class QuietSite(server.Site):
    """A Site without access log lines."""

    def log(self, request):
        pass


def make_site(metrics, health, view=None, credentials=None):
    """A twisted.web ``Site`` serving ``/metrics``, ``/healthz`` and, with a
    :class:`~fido_tx.observe.view.StatusView`, the status page.

    :param credentials: ``(username, password)`` for the status page, or None.
    """
    root = _Root()
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"healthz", HealthResource(health))
    if view is not None:
        from fido_tx.observe import page

        def guard(child):
            return page.BasicAuth(child, *credentials) if credentials else child

        root.putChild(b"", guard(page.StatusPage(view)))
        root.putChild(b"account", guard(page.AccountPages(view)))
    site = QuietSite(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


# the listener (bound at start, without twisted.web), here too for callers of before
from fido_tx.observe.listen import (  # noqa: E402,F401
    HttpService,
    ListenError,
    beyond_loopback,
    listen,
    listen_now,
)
