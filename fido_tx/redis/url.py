"""Redis URLs: parse, format, redact, and turn into a Twisted client endpoint.

Accepted forms (``[redis] url`` in ``fido.toml``)::

    redis://[[user]:password@]host[:port][/db]     plain TCP, port 6379, db 0
    rediss://[[user]:password@]host[:port][/db]    TLS; the certificate is
                                                   verified against the host name
    unix://[[user]:password@]/path/to/redis.sock[?db=N]
    redis+sentinel://[[user]:password@]s1[:26379],s2[:26379]/MASTER[/db]
    rediss+sentinel://...                          the same over TLS (sentinels
                                                   and the master)

``user`` and ``password`` are percent-decoded (write ``%40`` for ``@``); an
empty user with a password (``redis://:secret@host``) authenticates with the
password only (Redis < 6 style, or the ``default`` user).  IPv6 hosts go in
brackets: ``redis://[::1]:6379``.  ``?db=N`` is also accepted for
``redis://`` and ``rediss://`` when the path carries no db.  ``rediss://``
takes one more query parameter, ``ca_file=/path/ca.pem``: trust that CA
(instead of the system's trust store) for a server with a private CA.

Sentinel URLs name several sentinels (port 26379 by default) and the master
name; Fido asks the sentinels where the master is on every connect
(:mod:`fido_tx.redis.sentinel`), so it follows a failover without a restart.
``user:password@`` is the master's; sentinels that require their own
password take ``?sentinel_password=...`` (and ``sentinel_username``).

Nothing here ever puts the password into a message: :meth:`RedisURL.redacted`
is what goes into logs (``redis://user:***@host:6379/0``), and
:class:`RedisURLError` messages quote the redacted URL only.
"""

from urllib.parse import parse_qs, quote, unquote, urlsplit

import attr

DEFAULT_PORT = 6379
SENTINEL_PORT = 26379
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SCHEMES = ("redis", "rediss", "unix") + SENTINEL_SCHEMES


class RedisURLError(ValueError):
    """A Redis URL that cannot be used; the message never holds a password."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RedisURL:
    """A parsed Redis URL."""

    scheme: str
    host: str = ""
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = attr.ib(default=None, repr=False)
    #: socket path, for ``unix://`` only
    path: str = ""
    #: trust root for ``rediss://`` ("" = the system trust store)
    ca_file: str = ""
    #: Sentinel URLs: the sentinels' (host, port) pairs, in the order given
    sentinels: tuple = ()
    #: Sentinel URLs: the master's name
    master: str = ""
    sentinel_username: str | None = None
    sentinel_password: str | None = attr.ib(default=None, repr=False)

    @property
    def tls(self):
        return self.scheme in ("rediss", "rediss+sentinel")

    @property
    def sentinel(self):
        return self.scheme in SENTINEL_SCHEMES

    def at(self, host, port):
        """The plain URL of the server at ``host:port`` with this URL's
        credentials, db and TLS settings (a master found through Sentinel)."""
        return attr.evolve(
            self, scheme="rediss" if self.tls else "redis", host=host, port=port,
            sentinels=(), master="", sentinel_username=None, sentinel_password=None,
        )

    def to_url(self, redact=False):
        """The URL as text; ``redact=True`` puts ``***`` for the password."""
        auth = ""
        if self.password is not None:
            user = quote(self.username or "", safe="")
            secret = "***" if redact else quote(self.password, safe="")
            auth = f"{user}:{secret}@"
        elif self.username is not None:
            auth = quote(self.username, safe="") + "@"
        if self.scheme == "unix":
            url = f"unix://{auth}{quote(self.path, safe='/')}"
            return url + (f"?db={self.db}" if self.db else "")
        query = []
        if self.sentinel:
            hosts = ",".join(_hostport(h, p) for h, p in self.sentinels)
            url = f"{self.scheme}://{auth}{hosts}/{quote(self.master, safe='')}/{self.db}"
            if self.sentinel_username is not None:
                query.append("sentinel_username=" + quote(self.sentinel_username, safe=""))
            if self.sentinel_password is not None:
                secret = "***" if redact else quote(self.sentinel_password, safe="")
                query.append("sentinel_password=" + secret)
        else:
            url = f"{self.scheme}://{auth}{_hostport(self.host, self.port)}/{self.db}"
        if self.ca_file:
            query.append("ca_file=" + quote(self.ca_file, safe="/"))
        return url + ("?" + "&".join(query) if query else "")

    def redacted(self):
        """The URL for logs and messages: the password replaced by ``***``."""
        return self.to_url(redact=True)

    def __str__(self):
        return self.redacted()


def _hostport(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redact_raw(text):
    """Best-effort redaction of a URL that may not even parse.

    Everything between the user name and the last ``@`` is hidden, so an
    unescaped ``/`` or ``@`` in a password cannot leak part of it.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "<unparsable Redis URL>"
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        userinfo, hostpart = "", rest
        if "sentinel_password=" not in hostpart:
            return text
    user = userinfo.split(":", 1)[0]
    if "sentinel_password=" in hostpart:
        head, _, tail = hostpart.partition("sentinel_password=")
        hostpart = head + "sentinel_password=***" + tail[len(tail.split("&", 1)[0]):]
    return f"{scheme}://{user}:***@{hostpart}"


def redact(text):
    """Redact a URL given as text, whether it parses or not."""
    try:
        return parse(text).redacted()
    except RedisURLError:
        return _redact_raw(text)


def _int(value, what, shown):
    try:
        number = int(value, 10)
    except (TypeError, ValueError):
        raise RedisURLError(f"Redis URL {shown}: {what} {value!r} is not a number") from None
    if number < 0:
        raise RedisURLError(f"Redis URL {shown}: {what} {value!r} is negative")
    return number


def parse(text):
    """Parse a Redis URL into a :class:`RedisURL`; raise :class:`RedisURLError`."""
    if not isinstance(text, str) or not text:
        raise RedisURLError("Redis URL is empty")
    shown = _redact_raw(text)
    try:
        parts = urlsplit(text)
    except ValueError:
        raise RedisURLError(f"Redis URL {shown} is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise RedisURLError(
            f"Redis URL {shown}: scheme must be redis://, rediss://, unix:// "
            "or redis+sentinel://"
        )
    if parts.fragment:
        raise RedisURLError(f"Redis URL {shown}: a #fragment is not allowed")
    username, password, hostinfo = _userinfo(parts.netloc)
    query = _query(parts.query, scheme, shown)
    db = _int(query["db"][0], "db", shown) if "db" in query else None
    if scheme == "unix":
        return _parse_unix(hostinfo, parts.path, db, username, password, shown)
    if scheme in SENTINEL_SCHEMES:
        return _parse_sentinel(scheme, hostinfo, parts.path, query, db, username, password, shown)
    return _parse_tcp(scheme, parts, query, db, username, password, shown)


def _userinfo(netloc):
    """``(username, password, host part)`` of a URL's netloc (None: not given)."""
    if "@" not in netloc:
        return None, None, netloc
    userinfo, _, hostinfo = netloc.rpartition("@")
    if ":" in userinfo:
        user, _, secret = userinfo.partition(":")
        return unquote(user) or None, unquote(secret), hostinfo
    return unquote(userinfo) or None, None, hostinfo


def _query(text, scheme, shown):
    """The query's ``{key: [value]}``: only the parameters ``scheme`` takes,
    each at most once."""
    try:
        query = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError:
        raise RedisURLError(f"Redis URL {shown}: malformed query") from None
    allowed = {"db"} | ({"ca_file"} if scheme in ("rediss", "rediss+sentinel") else set())
    if scheme in SENTINEL_SCHEMES:
        allowed |= {"sentinel_username", "sentinel_password"}
    for key, values in query.items():
        if key not in allowed:
            raise RedisURLError(f"Redis URL {shown}: unknown parameter {key!r}")
        if len(values) != 1:
            raise RedisURLError(f"Redis URL {shown}: parameter {key!r} given twice")
    return query


def _parse_unix(hostinfo, path, db, username, password, shown):
    if hostinfo:
        raise RedisURLError(
            f"Redis URL {shown}: write unix:///path/to/socket (three slashes)"
        )
    path = unquote(path)
    if not path.startswith("/"):
        raise RedisURLError(f"Redis URL {shown}: the socket path must be absolute")
    return RedisURL(
        scheme="unix", host="", port=DEFAULT_PORT, db=db or 0,
        username=username, password=password, path=path,
    )


def _parse_tcp(scheme, parts, query, db, username, password, shown):
    try:
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        # the ValueError quotes the port text, which may be part of a password
        raise RedisURLError(f"Redis URL {shown}: bad port") from None
    if not host:
        raise RedisURLError(f"Redis URL {shown}: host is missing")
    if port == 0:
        raise RedisURLError(f"Redis URL {shown}: port 0 is not a port")
    # urlsplit lower-cases the host; keep IPv6 addresses without brackets
    path = parts.path
    if path in ("", "/"):
        path_db = None
    else:
        path_db = _int(path[1:], "db", shown)
    if path_db is not None and db is not None and path_db != db:
        raise RedisURLError(f"Redis URL {shown}: db given twice")
    ca_file = query.get("ca_file", [""])[0]
    return RedisURL(
        scheme=scheme, host=host, port=DEFAULT_PORT if port is None else port,
        db=path_db if path_db is not None else (db or 0),
        username=username, password=password, ca_file=ca_file,
    )


def _parse_sentinel(scheme, hostinfo, path, query, db, username, password, shown):
    sentinels = []
    for item in hostinfo.split(","):
        try:
            probe = urlsplit("//" + item)
            host, port = probe.hostname or "", probe.port
        except ValueError:
            raise RedisURLError(f"Redis URL {shown}: bad sentinel address") from None
        if not host:
            raise RedisURLError(f"Redis URL {shown}: a sentinel's host is missing")
        if port == 0:
            raise RedisURLError(f"Redis URL {shown}: port 0 is not a port")
        sentinels.append((host, port or SENTINEL_PORT))
    parts = [p for p in path.split("/")[1:]]
    if not parts or not parts[0]:
        raise RedisURLError(
            f"Redis URL {shown}: name the master: redis+sentinel://host:26379/MASTER/db"
        )
    if len(parts) > 2:
        raise RedisURLError(f"Redis URL {shown}: expected /MASTER or /MASTER/db")
    master = unquote(parts[0])
    path_db = _int(parts[1], "db", shown) if len(parts) == 2 and parts[1] else None
    if path_db is not None and db is not None and path_db != db:
        raise RedisURLError(f"Redis URL {shown}: db given twice")
    one = {k: v[0] for k, v in query.items()}
    return RedisURL(
        scheme=scheme, host=sentinels[0][0], port=sentinels[0][1],
        db=path_db if path_db is not None else (db or 0),
        username=username, password=password, ca_file=one.get("ca_file", ""),
        sentinels=tuple(sentinels), master=master,
        sentinel_username=one.get("sentinel_username") or None,
        sentinel_password=one.get("sentinel_password"),
    )


def endpoint(reactor, url, connect_timeout):
    """A Twisted client endpoint for ``url`` (a :class:`RedisURL`).

    ``rediss://`` verifies the server certificate against ``url.host`` with the
    system trust store, or against ``ca_file`` when given.
    """
    from twisted.internet import endpoints

    if url.sentinel:
        from fido_tx.redis.sentinel import SentinelEndpoint

        return SentinelEndpoint(reactor, url, connect_timeout)
    if url.scheme == "unix":
        return endpoints.UNIXClientEndpoint(reactor, url.path, timeout=connect_timeout)
    tcp = endpoints.HostnameEndpoint(reactor, url.host, url.port, timeout=connect_timeout)
    if not url.tls:
        return tcp
    from twisted.internet import ssl

    from fido_tx.lazytls import wrap_client_tls

    if url.ca_file:
        with open(url.ca_file, "rb") as f:
            extra = ssl.Certificate.loadPEM(f.read())
        trust = ssl.trustRootFromCertificates([extra])
        options = ssl.optionsForClientTLS(url.host, trustRoot=trust)
    else:
        options = ssl.optionsForClientTLS(url.host)
    return wrap_client_tls(options, tcp)
