"""Reading a mail_room configuration (YAML) into Fido's: accounts, deliveries
and the Redis URL, with one line per key saying what became of it.

mail_room's file is ``{":mailboxes": [{":host": ..., ...}, ...]}`` (Ruby
symbol keys, written with a leading colon; plain keys are accepted too), as
in mail_room's README and in the file GitLab renders from its
``config/mail_room.yml``.  ERB tags are refused: the file must be rendered
first.  :func:`convert` does the mapping without touching any file;
:mod:`fido_tx.cmd.import_mailroom` writes the results.

A file that cannot be read as a mail_room configuration raises
:class:`MailRoomError` (one line naming the key); a key that is understood
but has no Fido equivalent is reported as "could not map" and the rest is
still converted.
"""

import json
import re
from urllib.parse import urlsplit, urlunsplit

import attr

from fido_tx import errors

MAPPED, IGNORED, UNMAPPED = "mapped", "ignored", "could not map"

RENDER_HINT = (
    "render it first, e.g. from GitLab's Rails root: RAILS_ENV=production"
    " bundle exec ruby -rerb -e 'puts ERB.new(File.read(\"config/mail_room.yml\")).result'"
    " > mail_room.rendered.yml"
)

#: mail_room's own defaults (lib/mail_room/mailbox.rb)
DEFAULT_PORT, DEFAULT_NAME, DEFAULT_SEARCH = 993, "INBOX", "UNSEEN"

_SLUG = re.compile(r"[^A-Za-z0-9_.@+-]+")

_IGNORED_KEYS = {
    "idle_timeout": "Fido holds IDLE on its own schedule (accounts' idle = true)",
    "logger": "Fido logs through [log] in fido.toml",
    "arbitration_method": "Fido delivers each message once by its own dedupe record;"
    " several instances share accounts with [cluster] mode = \"lease\"",
    "arbitration_options": "see :arbitration_method:",
    "expunge_deleted": "Fido expunges what it deletes (after_fetch = \"delete\")",
    "structured": "Fido's log format is [log] format",
    "location": "Fido reads what the mailbox holds",
    "validate_ssl_certificates": "Fido always verifies certificates (ca_file adds a trust root)",
}


class MailRoomError(errors.OneLineError):
    """The file is not a usable mail_room configuration."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Line:
    where: str
    key: str
    outcome: str
    detail: str = ""

    def __str__(self):
        text = f"{self.where}: :{self.key}: {self.outcome}"
        return f"{text}: {self.detail}" if self.detail else text


@attr.s(slots=True, auto_attribs=True)
class Conversion:
    """What :func:`convert` made: accounts (JSON-ready dicts), deliveries
    (name -> ``[delivery.NAME]`` table), the ``[redis] url`` ("" = keep
    Fido's default), secret files to write (path -> text) and the lines."""

    accounts: list = attr.ib(factory=list)
    deliveries: dict = attr.ib(factory=dict)
    redis_url: str = ""
    secret_files: dict = attr.ib(factory=dict)
    lines: list = attr.ib(factory=list)

    @property
    def unmapped(self):
        return [line for line in self.lines if line.outcome == UNMAPPED]


def load_yaml(text, source):
    """Parse mail_room YAML text; keys lose their leading colon."""
    if "<%" in text:
        raise MailRoomError(f"{source}: contains ERB tags (<% ... %>): {RENDER_HINT}")
    import yaml

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise MailRoomError(f"{source}: not valid YAML{where}: {problem}") from None
    return _plain_keys(document)


def _plain_keys(value):
    if isinstance(value, dict):
        return {
            (k[1:] if isinstance(k, str) and k.startswith(":") else k): _plain_keys(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_plain_keys(v) for v in value]
    return value


def convert(document, source="mail_room.yml"):
    """Map a parsed mail_room document (from :func:`load_yaml`)."""
    if not isinstance(document, dict) or not isinstance(document.get("mailboxes"), list):
        raise MailRoomError(f"{source}: :mailboxes: missing or not a list of mailboxes")
    if not document["mailboxes"]:
        raise MailRoomError(f"{source}: :mailboxes: is empty")
    out = Conversion()
    for key in sorted(k for k in document if k != "mailboxes"):
        out.lines.append(Line(source, str(key), IGNORED, "not a mail_room option Fido knows"))
    ids = set()
    for index, box in enumerate(document["mailboxes"], 1):
        where = f"{source}: :mailboxes: entry {index}"
        if not isinstance(box, dict):
            raise MailRoomError(f"{where}: expected a mapping of options")
        _Mailbox(out, box, where, ids).convert()
    return out


def _need(box, key, where, kind=str):
    if key not in box or box[key] in (None, ""):
        raise MailRoomError(f"{where}: :{key}: is required")
    return _typed(box, key, where, kind)


def _typed(box, key, where, kind, default=None):
    value = box.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        names = {str: "a string", int: "an integer", bool: "true or false", dict: "a mapping",
                 list: "a list"}
        raise MailRoomError(f"{where}: :{key}: must be {names[kind]}, got {value!r:.40}")
    return value


def _slug(text):
    return _SLUG.sub("-", text).strip("-").lower() or "mailbox"


class _Mailbox:
    """One ``:mailboxes:`` entry -> one account (and its delivery)."""

    def __init__(self, out, box, where, ids):
        self.out, self.box, self.where, self.ids = out, box, where, ids
        self.account = {}
        self.done = set()

    def say(self, key, outcome, detail=""):
        self.done.add(key)
        self.out.lines.append(Line(self.where, key, outcome, detail))

    def convert(self):
        box, where = self.box, self.where
        email = _need(box, "email", where)
        graph = box.get("inbox_method") in ("microsoft_graph", "graph")
        name = _typed(box, "name", where, str, DEFAULT_NAME)
        base = _slug(email if name.lower() == "inbox" else f"{email}-{name}")
        account_id, n = base, 1
        while account_id in self.ids:
            n += 1
            account_id = f"{base}-{n}"
        self.ids.add(account_id)
        self.account["id"] = account_id
        if graph:
            self._graph(email, name)
        else:
            self._imap(email, name)
        self._after_fetch()
        self._search()
        self._delivery()
        for key in sorted(k for k in box if k not in self.done):
            if key in _IGNORED_KEYS:
                self.say(key, IGNORED, _IGNORED_KEYS[key])
            else:
                self.say(key, IGNORED, "not a mail_room option Fido knows")
        self.out.accounts.append(self.account)

    def _imap(self, email, name):
        box, where, a = self.box, self.where, self.account
        a["host"] = _need(box, "host", where)
        self.say("host", MAPPED, f"host = {a['host']!r}")
        ssl = _typed(box, "ssl", where, bool, False)
        start_tls = _typed(box, "start_tls", where, bool, False)
        a["security"] = "tls" if ssl else "starttls" if start_tls else "none"
        a["port"] = _typed(box, "port", where, int, DEFAULT_PORT)
        for key in ("ssl", "start_tls"):
            if key in box:
                self.say(key, MAPPED, f"security = {a['security']!r}"
                         + (" (plain text, as mail_room had it)" if a["security"] == "none" else ""))
        if "port" in box:
            self.say("port", MAPPED, f"port = {a['port']}")
        a["username"] = email
        self.say("email", MAPPED, f"username = {email!r}")
        a["password"] = _need(box, "password", where)
        self.say("password", MAPPED, "password (secret, not shown)")
        a["mailbox"] = name
        if "name" in box:
            self.say("name", MAPPED, f"mailbox = {name!r}")
        if "inbox_method" in box:
            self.say("inbox_method", MAPPED, "source = \"imap\"")
        if "inbox_options" in box:
            self.say("inbox_options", IGNORED, "only used by :inbox_method: microsoft_graph")

    def _graph(self, email, name):
        box, where, a = self.box, self.where, self.account
        options = _typed(box, "inbox_options", where, dict, {})
        ow = f"{where}: :inbox_options"
        a["source"] = "graph"
        a["user"] = email
        self.say("inbox_method", MAPPED, 'source = "graph"' + _graph_note())
        self.say("email", MAPPED, f"user = {email!r}")
        a["mailbox"] = "Inbox" if name.lower() == "inbox" else name
        if "name" in box:
            self.say("name", MAPPED, f"mailbox = {a['mailbox']!r}")
        oauth = {"provider": "microsoft"}
        oauth["tenant"] = _need(options, "tenant_id", ow)
        oauth["client_id"] = _need(options, "client_id", ow)
        oauth["client_secret"] = _need(options, "client_secret", ow)
        ad = _typed(options, "azure_ad_endpoint", ow, str, "")
        if ad and ad.rstrip("/") != "https://login.microsoftonline.com":
            oauth["token_url"] = f"{ad.rstrip('/')}/{oauth['tenant']}/oauth2/v2.0/token"
        graph = _typed(options, "graph_endpoint", ow, str, "")
        if graph:
            a["graph_endpoint"] = graph.rstrip("/")
        a["oauth"] = oauth
        self.say("inbox_options", MAPPED, "oauth = {provider microsoft, tenant, client_id,"
                 " client_secret (secret, not shown)}"
                 + (", token_url" if "token_url" in oauth else "")
                 + (", graph_endpoint" if graph else ""))
        for key in ("host", "port", "ssl", "start_tls", "password"):
            if key in box:
                self.say(key, IGNORED, "a Graph mailbox needs no IMAP server settings")

    def _after_fetch(self):
        box, where = self.box, self.where
        delete = _typed(box, "delete_after_delivery", where, bool, False)
        self.account["after_fetch"] = "delete" if delete else "seen"
        if "delete_after_delivery" in box:
            self.say("delete_after_delivery", MAPPED,
                     f"after_fetch = {self.account['after_fetch']!r} (only after a confirmed delivery)")

    def _search(self):
        box, where = self.box, self.where
        if "search_command" not in box:
            return
        command = str(_typed(box, "search_command", where, str, DEFAULT_SEARCH)).upper()
        if command == "UNSEEN":
            self.say("search_command", MAPPED, 'select = "unseen"')
        elif command == "NEW":
            # "every UID above the last one handled" from nothing would take
            # the whole mailbox, mail_room's read mail included: start at now
            self.account["select"] = "new"
            self.account["start_from"] = "now"
            self.say("search_command", MAPPED, 'select = "new", start_from = "now" (every message'
                     " arriving from Fido's first session on, read or not; none already there)")
        else:
            self.say("search_command", UNMAPPED,
                     f"{command!r}: Fido selects UNSEEN or new messages only (select)")

    def _delivery(self):
        box, where = self.box, self.where
        method = _typed(box, "delivery_method", where, str, "postback")
        options = _typed(box, "delivery_options", where, dict, {})
        dw = f"{where}: :delivery_options"
        if method == "postback":
            name, table = _Postback(self, options, dw).table()
        elif method == "sidekiq":
            name, table = _Sidekiq(self, options, dw).table()
        else:
            self.say("delivery_method", UNMAPPED,
                     f"{method!r}: Fido delivers by webhook (postback), sidekiq, stream or list;"
                     " the account is written with delivery = \"default\" (the Redis stream)")
            if "delivery_options" in box:
                self.say("delivery_options", IGNORED, f"options of {method!r}")
            return
        self.done.update({"delivery_options", "delivery_url", "delivery_token"})
        name = _share(self.out.deliveries, name, table)
        self.account["delivery"] = name
        self.say("delivery_method", MAPPED, f"[delivery.{name}] kind = {table['kind']!r}")


def _graph_note():
    """A warning while this Fido has no Graph source (it is built apart)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("fido_tx.sources.graph") is not None
    except ImportError:
        found = False
    return "" if found else (
        " (this Fido has no Microsoft Graph source yet: the daemon will not"
        " fetch this account until it has one)"
    )


def _share(deliveries, name, table):
    """Reuse an identical delivery; otherwise a name not taken yet."""
    for existing, other in deliveries.items():
        if other == table:
            return existing
    candidate, n = name, 1
    while candidate in deliveries:
        n += 1
        candidate = f"{name}-{n}"
    deliveries[candidate] = table
    return candidate


class _Postback:
    def __init__(self, mailbox, options, where):
        self.m, self.o, self.where = mailbox, options, where

    def lines(self, key, outcome, detail=""):
        self.m.out.lines.append(Line(self.where, key, outcome, detail))

    def table(self):
        o, where = self.o, self.where
        box = self.m.box
        url = o.get("delivery_url") or o.get("url") or box.get("delivery_url")
        if not url:
            raise MailRoomError(f"{where}: :delivery_url: is required for :delivery_method: postback")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise MailRoomError(f"{where}: :delivery_url: must be an http(s) URL")
        table = {"kind": "webhook", "url": url}
        segment = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
        name = _slug(segment or "webhook").replace(".", "-")
        used = {"delivery_url", "url"}
        self.lines("delivery_url" if "delivery_url" in o else "url", MAPPED, f"url = {url!r}")
        self._auth(table, used)
        if "content_type" in o:
            used.add("content_type")
            table["content_type"] = str(o["content_type"])
            self.lines("content_type", MAPPED, f"content_type = {table['content_type']!r}")
        for key in sorted(k for k in o if k not in used):
            self.lines(key, IGNORED, "not a postback option Fido knows")
        return name, table

    def _auth(self, table, used):
        o, m = self.o, self.m
        secret = o.get("jwt_secret_path")
        if o.get("jwt_auth_header") and secret:
            used.update({"jwt_auth_header", "jwt_secret_path", "jwt_issuer", "jwt_algorithm"})
            algorithm = o.get("jwt_algorithm") or "HS256"
            if algorithm != "HS256":
                self.lines("jwt_algorithm", UNMAPPED, f"{algorithm!r}: Fido signs HS256 (GitLab's)")
            table["auth"] = "gitlab-jwt"
            table["secret_file"] = str(secret)
            if o.get("jwt_auth_header") != "Gitlab-Mailroom-Api-Request":
                table["jwt_header"] = str(o["jwt_auth_header"])
            if o.get("jwt_issuer") and o["jwt_issuer"] != "gitlab-mailroom":
                table["jwt_issuer"] = str(o["jwt_issuer"])
            elif not o.get("jwt_issuer"):
                table["jwt_issuer"] = "mailroom"  # mail_room's default issuer
            self.lines("jwt_secret_path", MAPPED, f'auth = "gitlab-jwt", secret_file = {secret!r}')
            return
        token = o.get("delivery_token") or o.get("token") or m.box.get("delivery_token")
        if token:
            used.update({"delivery_token", "token"})
            path = f"{m.account['id']}.token"
            m.out.secret_files[path] = str(token)
            table.update(auth="bearer", token_file=path)
            self.lines("delivery_token", MAPPED, f'auth = "bearer", token_file = {path!r}'
                       " (written beside fido.toml, mode 0600; mail_room sent it as"
                       " 'Authorization: Token token=...': check the application accepts Bearer)")
            return
        user = o.get("username") or o.get("delivery_username")
        password = o.get("password") or o.get("delivery_password")
        if user and password:
            used.update({"username", "delivery_username", "password", "delivery_password"})
            path = f"{m.account['id']}.password"
            m.out.secret_files[path] = str(password)
            table.update(auth="basic", username=str(user), password_file=path)
            self.lines("username", MAPPED, f'auth = "basic", username = {user!r},'
                       f" password_file = {path!r} (mode 0600)")
            return
        table["auth"] = "none"


class _Sidekiq:
    def __init__(self, mailbox, options, where):
        self.m, self.o, self.where = mailbox, options, where

    def lines(self, key, outcome, detail=""):
        self.m.out.lines.append(Line(self.where, key, outcome, detail))

    def table(self):
        o, where, out = self.o, self.where, self.m.out
        table = {"kind": "sidekiq", "queue": str(o.get("queue") or "default")}
        worker = o.get("worker")
        if not worker:
            raise MailRoomError(f"{where}: :worker: is required for :delivery_method: sidekiq")
        table["worker"] = str(worker)
        if "queue" in o:
            self.lines("queue", MAPPED, f"queue = {table['queue']!r}")
        self.lines("worker", MAPPED, f"worker = {table['worker']!r}")
        if o.get("namespace"):
            table["namespace"] = str(o["namespace"])
            self.lines("namespace", MAPPED, f"namespace = {table['namespace']!r}")
        table["retry"] = False  # mail_room's jobs have retry false
        url = self._redis_url()
        if not out.redis_url:
            out.redis_url = url
            self.lines("redis_url", MAPPED, "[redis] url (Fido's dedupe record sits beside the jobs)")
        elif url != out.redis_url:
            table["redis_url"] = url
            self.lines("redis_url", MAPPED, "redis_url of this delivery")
        used = {"queue", "worker", "namespace", "redis_url", "redis_db", "sentinels"}
        for key in sorted(k for k in o if k not in used):
            if key in ("sentinel_password", "sentinel_username", "redis_ssl_params"):
                self.lines(key, UNMAPPED, "set it in the Redis URL or Fido's [redis] by hand")
            else:
                self.lines(key, IGNORED, "not a sidekiq option Fido knows")
        name = _slug(table["worker"]).replace(".", "-")
        return {"emailreceiverworker": "gitlab-incoming",
                "servicedeskemailreceiverworker": "gitlab-service-desk"}.get(name, name), table

    def _redis_url(self):
        o, where = self.o, self.where
        url = o.get("redis_url") or "redis://localhost:6379"
        if not isinstance(url, str):
            raise MailRoomError(f"{where}: :redis_url: must be a string")
        db = o.get("redis_db")
        parts = urlsplit(url)
        if db is not None:
            if isinstance(db, bool) or not isinstance(db, int):
                raise MailRoomError(f"{where}: :redis_db: must be an integer")
            parts = parts._replace(path=f"/{db}")
            self.lines("redis_db", MAPPED, f"database {db} in the Redis URL")
        sentinels = o.get("sentinels")
        if sentinels:
            if not isinstance(sentinels, list) or not all(isinstance(s, dict) for s in sentinels):
                raise MailRoomError(f"{where}: :sentinels: must be a list of {{host, port}}")
            hosts = ",".join(f"{s.get('host')}:{s.get('port', 26379)}" for s in sentinels)
            master = parts.hostname or "mymaster"
            path = parts.path.strip("/") or "0"
            url = f"redis+sentinel://{hosts}/{master}/{path}"
            if sentinel_supported():
                self.lines("sentinels", MAPPED, f"redis+sentinel:// URL with master {master!r}")
            else:
                self.lines("sentinels", UNMAPPED, "this Fido cannot use Redis Sentinel yet:"
                           " the redis+sentinel:// URL is written, replace it with the"
                           " current master's redis:// URL")
            return url
        return urlunsplit(parts)


def sentinel_supported():
    """Whether this Fido's Redis URL parser takes ``redis+sentinel://``."""
    from fido_tx.redis import url as redisurl

    try:
        redisurl.parse("redis+sentinel://127.0.0.1:26379/mymaster/0")
    except Exception:
        return False
    return True


def accounts_json(conversion):
    """The accounts file text of a conversion."""
    return json.dumps({"accounts": conversion.accounts}, indent=2, ensure_ascii=False) + "\n"
