"""Settings (frozen attrs), discovery of ``fido.toml``, the default file, validation.

The settings classes below are the schema other modules rely on (field
names, types, defaults).  Every field is a key of the section of the same
name in ``fido.toml``; :func:`load_settings` finds, reads and validates the
file and resolves the paths in it relative to the file's directory.
"""

import glob
import ipaddress
import math
import os
import re
import tomllib
from urllib.parse import urlsplit

import attr

from fido_tx import errors

MIB = 1024 * 1024
GIB = 1024 * MIB
HOUR = 3600.0
DAY = 86400.0
WEEK = 7 * DAY
#: sane bounds of the numbers in fido.toml (README "Bounds")
MAX_WORKERS = 10_000
MIN_POLL_INTERVAL = 1.0
#: largest config file read (a FIFO or /dev/zero is refused before reading)
MAX_CONFIG_BYTES = MIB


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FidoSettings:
    accounts_file: str = "accounts.json.enc"  # absolute after loading
    key_file: str = "fido.key"  # absolute after loading; "" = plain JSON
    workers: int = 100
    poll_interval: float = 60.0
    dry_run: bool = False
    shard: str = "1/1"
    #: "auto" (inotify/kqueue/poll by platform) or "poll" (network file systems)
    watch: str = "auto"
    #: seconds a running session may take to finish its batch on SIGTERM
    grace_period: float = 20.0
    #: where the last good accounts set is cached ("" = next to the accounts file)
    state_dir: str = ""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ImapSettings:
    connect_timeout: float = 30.0
    greeting_timeout: float = 30.0
    command_timeout: float = 60.0
    logout_timeout: float = 5.0
    #: longest a whole session may take (0 = no limit): a server that keeps
    #: talking without ever finishing cannot hold a worker slot for ever
    session_timeout: float = 1800.0
    #: bytes/second below which a literal (message body) transfer is aborted
    min_literal_rate: int = 4096
    #: UIDs per UID FETCH
    batch_messages: int = 25
    #: bytes (by RFC822.SIZE) per UID FETCH
    batch_bytes: int = 8 * MIB
    #: bytes (by RFC822.SIZE) of message bodies in flight, all sessions together
    max_inflight_bytes: int = 8 * MIB
    max_message_size: int = 50 * MIB
    #: UIDs taken from one UID SEARCH answer; a mailbox with more unseen
    #: messages is fetched in parts, the rest at the next polls
    max_search_uids: int = 100_000
    #: keyword set on messages left on the server because they are too large
    too_large_keyword: str = "$FidoTooLarge"
    #: keyword set on messages the sink refused for good (left on the server)
    rejected_keyword: str = "$FidoRejected"
    #: held connections: seconds before IDLE is ended and re-issued (< 29 min)
    idle_refresh: float = 600.0
    #: held connections: at most this many per server host name (more
    #: accounts on that host poll with fresh connections)
    max_connections_per_host: int = 1000
    #: held connections: seconds between the shared ticks their periodic
    #: checks are due on (rounded down: a check comes at most this much
    #: early, with the other accounts' of that tick); 0: each its own timer
    poll_tick: float = 1.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class BackoffSettings:
    #: first retry delay after a transient failure, seconds
    initial: float = 30.0
    maximum: float = 1800.0
    #: first retry delay after an authentication failure
    auth_initial: float = 600.0
    auth_maximum: float = 21600.0
    #: +/- fraction of random jitter
    jitter: float = 0.2


def redact_url(url):
    """``repr`` of ``url`` with any password replaced by ``***``."""
    from fido_tx.redis import url as redisurl

    return repr(redisurl.redact(url))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RedisSettings:
    #: repr hides the password of redis://user:password@host
    url: str = attr.ib(default="redis://127.0.0.1:6379/0", repr=redact_url)
    stream: str = "fido:messages"
    max_backlog: int = 100000
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    #: WAIT for this many replicas to have each batch before marking it
    min_replicas: int = 0
    #: how long (seconds) to wait for them; then nothing is marked
    replica_timeout: float = 5.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClusterSettings:
    #: "shard" (``[fido] shard = "k/n"``) or "lease" (instances share every
    #: account through leases in Redis)
    mode: str = "shard"
    #: seconds a lease lasts unless renewed (renewed every third of it)
    lease_ttl: float = 60.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ReporterSettings:
    url: str = ""
    token: str = attr.ib(default="", repr=False)
    timeout: float = 10.0
    queue_size: int = 1000


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HttpSettings:
    listen: str = "tcp:9119:interface=127.0.0.1"
    #: basic authentication of the status page ("" = none; required off loopback)
    username: str = ""
    #: file holding the password (its first line); "" = none
    password_file: str = ""
    #: sessions kept per account in Redis for the account page (0 = none)
    recent_sessions: int = 50


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LogSettings:
    level: str = "info"
    format: str = "text"
    #: "" = twistd's own log (stdout with -n, --logfile otherwise)
    file: str = ""
    rotate_length: int = 10 * MIB
    max_rotated_files: int = 10


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RoutingSettings:
    #: GitLab's incoming_email.address format, "incoming+%{key}@host";
    #: "" = no route keys (see fido_tx.routing)
    template: str = ""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DeliverySettings:
    """One ``[delivery.NAME]`` table: its ``kind`` (a key of
    :data:`fido_tx.sinks.SINKS`) and the kind module's validated options."""

    kind: str = "stream"
    options: dict = attr.ib(factory=dict)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Settings:
    fido: FidoSettings = attr.ib(factory=FidoSettings)
    imap: ImapSettings = attr.ib(factory=ImapSettings)
    backoff: BackoffSettings = attr.ib(factory=BackoffSettings)
    redis: RedisSettings = attr.ib(factory=RedisSettings)
    reporter: ReporterSettings = attr.ib(factory=ReporterSettings)
    http: HttpSettings = attr.ib(factory=HttpSettings)
    log: LogSettings = attr.ib(factory=LogSettings)
    routing: RoutingSettings = attr.ib(factory=RoutingSettings)
    #: ``[delivery.NAME]`` -> :class:`DeliverySettings`; read them with
    #: :meth:`delivery_tables`, which implies ``default`` from ``[redis] stream``
    deliveries: dict = attr.ib(factory=dict)
    cluster: ClusterSettings = attr.ib(factory=ClusterSettings)
    #: the file these settings came from ("" when built in code)
    path: str = ""

    def delivery_tables(self):
        """``{name: DeliverySettings}`` with ``default`` always there: when
        no ``[delivery.default]`` is given, the stream of ``[redis] stream``
        (configs from before deliveries keep their meaning)."""
        tables = dict(self.deliveries)
        if "default" not in tables:
            tables["default"] = DeliverySettings("stream", {"stream": self.redis.stream})
        return tables


#: ``[section]`` name -> settings class (and the attribute of :class:`Settings`)
SECTIONS = {
    "fido": FidoSettings,
    "imap": ImapSettings,
    "backoff": BackoffSettings,
    "redis": RedisSettings,
    "reporter": ReporterSettings,
    "http": HttpSettings,
    "log": LogSettings,
    "routing": RoutingSettings,
    "cluster": ClusterSettings,
}

#: keys holding file system paths, resolved relative to the config file
#: ("" stays "": it means "not set")
PATH_KEYS = frozenset(
    [
        ("fido", "accounts_file"),
        ("fido", "key_file"),
        ("fido", "state_dir"),
        ("log", "file"),
        ("http", "password_file"),
    ]
)

#: keys whose values never appear in an error message
SECRET_KEYS = frozenset([("reporter", "token"), ("redis", "url")])

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
WATCH_MODES = ("auto", "poll")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
CLUSTER_MODES = ("shard", "lease")
REPORTER_SCHEMES = ("http", "https")

ENV_VAR = "FIDO_CONFIG"
CONFIG_NAME = "fido.toml"

_SHARD_RE = re.compile(r"\A([0-9]+)/([0-9]+)\Z")
# An IMAP keyword is an atom: no space, controls or ( ) { % * " \ ]
_KEYWORD_RE = re.compile(r'\A[^\x00-\x20\x7f(){%*"\\\]]+\Z')


class ConfigError(errors.OneLineError):
    """The configuration cannot be used.

    ``str()`` is one line that names the file and the key, fit for the
    ``fido`` command's ``fido: error: ...`` and for twistd's usage error.
    """


def _default_home():
    return os.path.expanduser("~")


def _default_is_root():
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and geteuid() == 0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Roots:
    """Where :func:`load_settings` looks for and creates ``fido.toml``.

    A parameter so that tests never touch the real ``/etc`` or home.
    """

    etc: str = "/etc/fido"
    deploy_globs: tuple = (
        "/srv/*/current/config/fido.toml",
        "/var/www/*/current/config/fido.toml",
    )
    home: str = attr.ib(factory=_default_home)
    is_root: bool = attr.ib(factory=_default_is_root)

    def search_path(self):
        """The fixed candidates after ``--config`` and ``$FIDO_CONFIG``, in order.

        Deploy globs are expanded (sorted) at call time.
        """
        found = [os.path.join(self.etc, CONFIG_NAME)]
        for pattern in self.deploy_globs:
            found.extend(sorted(glob.glob(pattern)))
        found.append(os.path.join(self.home, ".config", "fido", CONFIG_NAME))
        found.append(os.path.join(self.home, ".fido.toml"))
        return found

    def creation_candidates(self):
        """Where a default file may be written, in order of preference."""
        places = []
        if self.is_root:
            places.append(os.path.join(self.etc, CONFIG_NAME))
        places.append(os.path.join(self.home, ".config", "fido", CONFIG_NAME))
        return places


def default_text():
    """The commented default ``fido.toml`` (package data ``default.toml``)."""
    # imported here: only a start without a config file needs it (~10 ms of
    # a start's CPU, issue 15)
    import importlib.resources

    return (
        importlib.resources.files("fido_tx")
        .joinpath("default.toml")
        .read_text(encoding="utf-8")
    )


def find_config(explicit=None, environ=os.environ, roots=None):
    """The path of the config file to use, or ``None`` when there is none.

    ``explicit`` (``--config``) and ``$FIDO_CONFIG`` must name an existing
    file (:class:`ConfigError` otherwise); the other candidates are skipped
    when missing.
    """
    if roots is None:
        roots = Roots()
    if explicit:
        path = os.path.abspath(os.path.expanduser(explicit))
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file (--config) does not exist")
        return path
    from_env = environ.get(ENV_VAR, "")
    if from_env:
        path = os.path.abspath(os.path.expanduser(from_env))
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file (${ENV_VAR}) does not exist")
        return path
    for candidate in roots.search_path():
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return None


def write_default(path, force=False, mode=0o644):
    """Write the commented default config to ``path`` atomically.

    Creates missing parent directories.  Refuses (``FileExistsError``) to
    replace an existing file unless ``force``.  Returns the absolute path.
    """
    path = os.path.abspath(os.path.expanduser(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    data = default_text().encode("utf-8")
    if force:
        return atomic_write(path, data, mode)
    # Complete file under a temporary name, then link(): atomic, and it
    # fails instead of replacing a file that appeared meanwhile.
    tmp = _temporary_file(path, mode)
    try:
        _fill(tmp, data, mode)
        os.link(tmp, path)
    finally:
        _unlink_quietly(tmp)
    return path


def create_default(roots=None):
    """Write the default config to the first writable creation candidate.

    Returns the path written; :class:`ConfigError` when no place is writable.
    """
    if roots is None:
        roots = Roots()
    failures = []
    for candidate in roots.creation_candidates():
        try:
            return write_default(candidate)
        except FileExistsError:
            # Someone else created it in the meantime: use theirs.
            return os.path.abspath(candidate)
        except OSError as e:
            failures.append(f"{candidate}: {e.strerror or e}")
    raise ConfigError(
        "no config file found and none could be created (" + "; ".join(failures) + ")"
    )


def load_settings(explicit=None, environ=os.environ, roots=None, dry_run=None):
    """Find, read and validate ``fido.toml``.

    :param explicit: ``--config PATH``; must exist.
    :param environ: the environment (``$FIDO_CONFIG``).
    :param roots: a :class:`Roots`; the real system locations by default.
    :param dry_run: ``True`` (``--dry-run``) forces ``fido.dry_run`` on;
        ``None`` or ``False`` leaves the file's value.
    :returns: ``(settings, path, created)``: ``created`` is true when no file
        existed and the default was written to ``path`` (log it).
    :raises ConfigError: one line naming the file and the key.
    """
    if roots is None:
        roots = Roots()
    path = find_config(explicit, environ, roots)
    created = False
    if path is None:
        path = create_default(roots)
        created = True
    settings = read_settings(path)
    if dry_run:
        settings = attr.evolve(
            settings, fido=attr.evolve(settings.fido, dry_run=True)
        )
    return settings, path, created


def read_settings(path):
    """Read and validate one config file (no discovery)."""
    path = os.path.abspath(os.path.expanduser(path))
    from fido_tx import boundedfile

    try:
        raw = boundedfile.read_regular(path, MAX_CONFIG_BYTES, "config file")
        data = tomllib.loads(raw.decode("utf-8"))
    except boundedfile.FileRefused as e:
        raise ConfigError(f"{path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 ({e.reason})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_settings(data, path)


def parse_settings(data, path):
    """Validate a parsed TOML mapping into :class:`Settings`.

    ``path`` names the file in messages; relative paths are resolved against
    its directory.
    """
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a TOML document of [sections]")
    for name, table in data.items():
        if name == DELIVERY_SECTION and isinstance(table, dict):
            continue
        if name not in SECTIONS:
            if isinstance(table, dict):
                raise ConfigError(f"{path}: unknown section [{name}]")
            raise ConfigError(
                f"{path}: unknown key {name} (keys belong in a section: "
                + ", ".join(f"[{s}]" for s in SECTIONS)
                + ")"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table (section)")
    sections = {
        name: _parse_section(path, base, name, data.get(name, {})) for name in SECTIONS
    }
    deliveries = _parse_deliveries(path, base, data.get(DELIVERY_SECTION, {}))
    settings = Settings(path=path, deliveries=deliveries, **sections)
    _check_settings(path, settings)
    return settings


DELIVERY_SECTION = "delivery"
_DELIVERY_NAME_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")


def _parse_deliveries(path, base, tables):
    """``[delivery.NAME]`` tables -> ``{name: DeliverySettings}`` (the
    implied ``default`` is added by :meth:`Settings.delivery_tables`)."""
    return {name: _parse_delivery(path, base, name, table) for name, table in tables.items()}


def _parse_delivery(path, base, name, table):
    from fido_tx import sinks

    where = f"[{DELIVERY_SECTION}.{name}]"
    if not _DELIVERY_NAME_RE.match(name):
        raise ConfigError(f"{path}: {where}: a delivery name is 1-64 of A-Z a-z 0-9 _ . -")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {where} must be a table (section)")
    kinds = ", ".join(f'"{k}"' for k in sinks.SINKS)
    kind = table.get("kind")
    if kind not in sinks.SINKS:
        got = "nothing" if kind is None else _show(where, "kind", kind)
        raise ConfigError(f"{path}: {where} kind: must be one of {kinds}, got {got}")
    try:
        module = sinks.module(kind)
    except ImportError:
        raise ConfigError(
            f"{path}: {where} kind: {kind!r} is not available in this version of Fido"
        ) from None
    options = {}
    for key, value in table.items():
        if key == "kind":
            continue
        if key not in module.OPTIONS:
            raise ConfigError(f"{path}: unknown key {where} {key}")
        default = module.OPTIONS[key]
        expected = str if default is None else type(default)
        options[key] = _coerce(path, where[1:-1], key, expected, value)
    for key, default in module.OPTIONS.items():
        if key not in options:
            if default is None:
                raise ConfigError(f"{path}: {where} {key}: required for kind {kind!r}")
            options[key] = default
    try:
        options = module.validate(options, base)
    except ValueError as e:
        raise ConfigError(f"{path}: {where} {_one_line(e)}") from None
    return DeliverySettings(kind, options)


def _parse_section(path, base, section, table):
    cls = SECTIONS[section]
    fields = {f.name: f for f in attr.fields(cls)}
    values = {}
    for key, value in table.items():
        field = fields.get(key)
        if field is None:
            raise ConfigError(f"{path}: unknown key [{section}] {key}")
        values[key] = _coerce(path, section, key, field.type, value)
    settings = cls(**values)
    resolved = {}
    for key in fields:
        value = getattr(settings, key)
        if (section, key) in PATH_KEYS and value:
            resolved[key] = os.path.normpath(
                os.path.join(base, os.path.expanduser(value))
            )
    return attr.evolve(settings, **resolved) if resolved else settings


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _show(section, key, value):
    """``value`` for a message: its TOML type, and its repr unless secret."""
    if (section, key) in SECRET_KEYS or section.startswith(DELIVERY_SECTION + "."):
        # a delivery's keys may hold a secret (a webhook's token): type only
        return _toml_type(value)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_toml_type(value)} {text}"


def _toml_type(value):
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return "date/time"


def _coerce(path, section, key, expected, value):
    ok = False
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:
                ok = False
            else:
                if not math.isfinite(value):
                    raise ConfigError(
                        f"{path}: [{section}] {key}: must be a finite number, got {value!r}"
                    )
    elif expected is str:
        ok = isinstance(value, str)
    elif expected not in _TYPE_NAMES:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(
            f"{path}: [{section}] {key}: expected"
            f" {_TYPE_NAMES.get(expected, 'a ' + expected.__name__)},"
            f" got {_show(section, key, value)}"
        )
    return value


def parse_shard(shard):
    """``"k/n"`` -> ``(k, n)`` with ``1 <= k <= n``; ``ValueError`` otherwise."""
    m = _SHARD_RE.match(shard) if isinstance(shard, str) else None
    if m is None:
        raise ValueError(f'must be "k/n" (for example "1/1" or "2/3"), got {shard!r}')
    k, n = int(m.group(1)), int(m.group(2))
    if not 1 <= k <= n:
        raise ValueError(f"must be k/n with 1 <= k <= n, got {shard!r}")
    return k, n


def _rules(path):
    """The value checks, bound to ``path`` for the one-line errors."""

    def bad(section, key, why):
        raise ConfigError(f"{path}: [{section}] {key}: {why}")

    def positive(section, key, value):
        if not value > 0:
            bad(section, key, f"must be greater than 0, got {value!r}")

    def at_least(section, key, value, low):
        if not value >= low:
            bad(section, key, f"must be at least {low}, got {value!r}")

    def within(section, key, value, low, high, unit=""):
        if not low <= value <= high:
            bad(section, key, f"must be from {low:g}{unit} to {high:g}{unit}, got {value!r}")

    def timeout(section, key, value, high=DAY):
        positive(section, key, value)
        if value > high:
            bad(section, key, f"must be at most {high:g} s, got {value!r}")

    def one_of(section, key, value, allowed):
        if value not in allowed:
            bad(
                section,
                key,
                "must be one of " + ", ".join(f'"{a}"' for a in allowed)
                + f", got {value!r}",
            )

    return bad, positive, at_least, within, timeout, one_of


def _check_settings(path, s):
    """Value rules (types are already right), one section at a time."""
    rules = _rules(path)
    _section_fido(s, *rules)
    _section_imap(s, *rules)
    _section_backoff(s, *rules)
    _section_redis(s, *rules)
    _section_cluster(s, *rules)
    _section_reporter(s, *rules)
    _section_http(s, *rules)
    _section_log(s, *rules)
    _section_routing(s, *rules)


def _section_fido(s, bad, positive, at_least, within, timeout, one_of):
    f = s.fido
    if not f.accounts_file:
        bad("fido", "accounts_file", "must not be empty")
    at_least("fido", "workers", f.workers, 1)
    within("fido", "workers", f.workers, 1, MAX_WORKERS)
    positive("fido", "poll_interval", f.poll_interval)
    within("fido", "poll_interval", f.poll_interval, MIN_POLL_INTERVAL, DAY, " s")
    try:
        parse_shard(f.shard)
    except ValueError as e:
        bad("fido", "shard", str(e))
    one_of("fido", "watch", f.watch, WATCH_MODES)
    at_least("fido", "grace_period", f.grace_period, 0)
    within("fido", "grace_period", f.grace_period, 0, HOUR, " s")


def _section_imap(s, bad, positive, at_least, within, timeout, one_of):
    i = s.imap
    if not 0 < i.idle_refresh < 29 * 60:
        bad("imap", "idle_refresh", "must be greater than 0 and under 1740 (29 minutes: "
            f"servers end an IDLE after 30), got {i.idle_refresh!r}")
    at_least("imap", "max_connections_per_host", i.max_connections_per_host, 1)
    within("imap", "poll_tick", i.poll_tick, 0, 60, " s")
    for key in ("connect_timeout", "greeting_timeout", "command_timeout", "logout_timeout"):
        timeout("imap", key, getattr(i, key))
    at_least("imap", "min_literal_rate", i.min_literal_rate, 0)
    within("imap", "min_literal_rate", i.min_literal_rate, 0, GIB)
    at_least("imap", "session_timeout", i.session_timeout, 0)
    within("imap", "session_timeout", i.session_timeout, 0, DAY, " s")
    for key in ("batch_messages", "batch_bytes", "max_message_size", "max_inflight_bytes"):
        positive("imap", key, getattr(i, key))
    within("imap", "batch_messages", i.batch_messages, 1, 10_000)
    within("imap", "batch_bytes", i.batch_bytes, 1024, GIB)
    within("imap", "max_message_size", i.max_message_size, 1024, 2 * GIB)
    within("imap", "max_inflight_bytes", i.max_inflight_bytes, 64 * 1024, 64 * GIB)
    within("imap", "max_search_uids", i.max_search_uids, 1, 1_000_000)
    for key in ("too_large_keyword", "rejected_keyword"):
        value = getattr(i, key)
        if not _KEYWORD_RE.match(value) or value.startswith("\\"):
            bad(
                "imap",
                key,
                "must be an IMAP keyword (letters, digits, $ . _ -; no spaces),"
                f" got {value!r}",
            )


def _section_backoff(s, bad, positive, at_least, within, timeout, one_of):
    b = s.backoff
    for key in ("initial", "maximum", "auth_initial", "auth_maximum"):
        timeout("backoff", key, getattr(b, key), WEEK)
    if b.maximum < b.initial:
        bad("backoff", "maximum", f"must be at least initial ({b.initial!r}), got {b.maximum!r}")
    if b.auth_maximum < b.auth_initial:
        bad(
            "backoff",
            "auth_maximum",
            f"must be at least auth_initial ({b.auth_initial!r}), got {b.auth_maximum!r}",
        )
    if not 0 <= b.jitter < 1:
        bad("backoff", "jitter", f"must be from 0 up to (not including) 1, got {b.jitter!r}")


def _section_redis(s, bad, positive, at_least, within, timeout, one_of):
    r = s.redis
    scheme = _scheme(r.url)
    if scheme not in REDIS_SCHEMES:
        bad(
            "redis",
            "url",
            "scheme must be redis://, rediss://, unix:// or redis+sentinel://, got "
            + (f"{scheme}://" if scheme else "no scheme"),
        )
    from fido_tx.redis import url as redisurl

    try:
        redisurl.parse(r.url)
    except redisurl.RedisURLError as e:
        bad("redis", "url", _one_line(e))  # its messages hold no password
    if not r.stream:
        bad("redis", "stream", "must not be empty")
    at_least("redis", "max_backlog", r.max_backlog, 1)
    within("redis", "max_backlog", r.max_backlog, 1, 1_000_000_000)
    timeout("redis", "connect_timeout", r.connect_timeout)
    timeout("redis", "command_timeout", r.command_timeout)
    at_least("redis", "min_replicas", r.min_replicas, 0)
    if r.min_replicas > 100:
        bad("redis", "min_replicas", f"must be at most 100, got {r.min_replicas!r}")
    timeout("redis", "replica_timeout", r.replica_timeout)


def _section_cluster(s, bad, positive, at_least, within, timeout, one_of):
    c = s.cluster
    one_of("cluster", "mode", c.mode, CLUSTER_MODES)
    if not 3 <= c.lease_ttl <= 3600:
        bad("cluster", "lease_ttl", f"must be from 3 to 3600 seconds, got {c.lease_ttl!r}")
    if c.mode == "lease" and s.fido.shard != "1/1":
        bad("cluster", "mode", '"lease" shares every account: leave [fido] shard at "1/1"')


def _section_reporter(s, bad, positive, at_least, within, timeout, one_of):
    p = s.reporter
    if p.url:
        scheme = _scheme(p.url)
        if scheme not in REPORTER_SCHEMES or not urlsplit(p.url).netloc:
            bad("reporter", "url", f'must be an http:// or https:// URL or "", got '
                                   f"{_without_userinfo(p.url)!r}")
        if "@" in urlsplit(p.url).netloc:
            bad("reporter", "url", "must not hold user:password@ (the web application is "
                                   "sent [reporter] token as a Bearer token), got "
                                   f"{_without_userinfo(p.url)!r}")
    timeout("reporter", "timeout", p.timeout)
    at_least("reporter", "queue_size", p.queue_size, 1)
    within("reporter", "queue_size", p.queue_size, 1, 1_000_000)


def _section_http(s, bad, positive, at_least, within, timeout, one_of):
    h = s.http
    if h.listen:
        why = listen_problem(h.listen)
        if why:
            bad("http", "listen", why)

    _check_http(s.http, bad)


def _section_log(s, bad, positive, at_least, within, timeout, one_of):
    g = s.log
    one_of("log", "level", g.level, LOG_LEVELS)
    one_of("log", "format", g.format, LOG_FORMATS)
    positive("log", "rotate_length", g.rotate_length)
    within("log", "rotate_length", g.rotate_length, 1024, 1024 * GIB)
    at_least("log", "max_rotated_files", g.max_rotated_files, 1)
    within("log", "max_rotated_files", g.max_rotated_files, 1, 10_000)
    if g.file and os.path.isdir(g.file):
        bad("log", "file", f"{g.file} is a directory; name a file in it")


def _section_routing(s, bad, positive, at_least, within, timeout, one_of):
    from fido_tx import routing

    try:
        routing.check_template(s.routing.template)
    except ValueError as e:
        bad("routing", "template", str(e))

class _NoReactor:
    """Stands in for the reactor while an endpoint description is only parsed."""


def uses_tls(description):
    """Whether the ``[http] listen`` description is a TLS listener (``ssl:``)."""
    return description.strip().lower().startswith("ssl:")


def listen_problem(description):
    """Why ``[http] listen`` cannot be used (one line), or ``None``.

    Only parses the ``serverFromString`` description (nothing listens):
    an unknown endpoint type, a port that is not a number.
    """
    from fido_tx import private

    # the reactor and endpoints with pyOpenSSL only for an ``ssl:`` listener
    private.import_twisted(tls=uses_tls(description))
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(_NoReactor(), description)
    except (ValueError, KeyError, TypeError, OSError) as e:  # OSError: ssl: key files
        text = _one_line(e) or type(e).__name__
        return (f'cannot use {description!r} ({text}); write it like '
                f'"tcp:9119:interface=127.0.0.1", or "" for off')
    return None


def _without_userinfo(url):
    """``url`` with any ``user:password@`` replaced (for messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="<user info>@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def _check_http(h, bad):
    if h.recent_sessions < 0:
        bad("http", "recent_sessions", f"must be 0 or more, got {h.recent_sessions!r}")
    if bool(h.username) != bool(h.password_file):
        bad("http", "username" if h.password_file else "password_file",
            "username and password_file go together: set both, or neither")
    if h.password_file:
        try:
            read_password(h.password_file)
        except (OSError, ValueError) as e:
            bad("http", "password_file", _one_line(e))
    if h.listen and not h.username and not listen_is_local(h.listen):
        bad("http", "listen",
            f"{h.listen!r} is reachable beyond this machine: set [http] username and "
            "password_file to protect the status page, or listen on 127.0.0.1")


def read_password(path):
    """The status page's password: the first line of ``path`` (ValueError if empty)."""
    with open(path, encoding="utf-8") as f:
        password = f.readline().rstrip("\r\n")
    if not password:
        raise ValueError(f"{path}: the first line is empty: write the password there")
    return password


def listen_is_local(description):
    """Whether a Twisted server endpoint description only listens on this machine:
    ``unix:``, or ``tcp``/``tcp6``/``ssl`` with a loopback ``interface=``."""
    parts = re.split(r"(?<!\\):", description)
    kind = parts[0].lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    for part in parts[1:]:
        if part.startswith("interface="):
            address = part[len("interface="):].replace("\\:", ":")
            if address == "localhost":
                return True
            try:
                return ipaddress.ip_address(address).is_loopback
            except ValueError:
                return False
    return False


def _one_line(text):
    return " ".join(str(text).split())


def _scheme(url):
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


# -- file helpers shared with the CLI -------------------------------------


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _temporary_file(path, mode):
    directory, name = os.path.split(path)
    for attempt in range(100):
        tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}.{attempt}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        except FileExistsError:
            continue
        except OSError as e:
            # Name the file the caller asked for, not the temporary one.
            raise type(e)(e.errno, e.strerror, path) from None
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")  # pragma: no cover


def _fill(tmp, data, mode):
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        _write_all(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data, mode=0o600):
    """Write ``data`` (bytes) to ``path`` via a temporary file and a rename.

    The temporary file is created with ``O_EXCL`` and ``mode`` in the same
    directory, so readers see the old or the new file, never a part, and
    the data is never readable with a wider mode.  Returns the absolute path.
    """
    path = os.path.abspath(path)
    tmp = _temporary_file(path, mode)
    try:
        _fill(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path
