"""Where mail goes: one module per delivery kind, picked by ``[delivery.NAME]
kind`` through :data:`SINKS` (mail_room's ``delivery/`` registry is the
example: a new sink is a new file and one line here).

Each module named here defines ``KIND``, ``OPTIONS`` (its keys besides
``kind`` with their defaults; the default's type is the key's type, ``None``
marks a required key), ``validate(options, base_dir) -> dict`` (raises
``ValueError`` with one line naming the key) and ``build(name, options, ctx)
-> ISink`` with ``ctx`` a :class:`SinkContext`.  Modules are imported lazily.
"""

import importlib

import attr

#: delivery kind -> module path
SINKS = {
    "stream": "fido_tx.sinks.stream",
    "list": "fido_tx.sinks.list",
    "sidekiq": "fido_tx.sinks.sidekiq",
    "webhook": "fido_tx.sinks.webhook",
}

#: the delivery an account without ``delivery`` uses
DEFAULT_DELIVERY = "default"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SinkContext:
    """What a sink module's ``build`` is given by the composition root."""

    reactor: object
    #: the shared :class:`fido_tx.redis.connection.RedisConnection`
    redis: object
    dry_run: bool = False
    log: object = None
    #: ``[redis] min_replicas`` / ``replica_timeout``: the Redis sinks WAIT
    #: for that many replicas before they confirm anything
    min_replicas: int = 0
    replica_timeout: float = 5.0


def module(kind):
    """The sink module of ``kind``; ``KeyError`` for an unknown kind,
    ``ImportError`` for a registered one that is not installed yet."""
    return importlib.import_module(SINKS[kind])


def delivery_sinks(settings, ctx):
    """``{name: ISink}``, one per ``[delivery.NAME]`` of ``settings``
    (:class:`fido_tx.config.Settings`, validated), ``default`` included."""
    return {
        name: module(d.kind).build(name, dict(d.options), ctx)
        for name, d in settings.delivery_tables().items()
    }
