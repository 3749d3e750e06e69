"""Accounts: the value objects, loading the accounts file, and set differences.

The accounts file is JSON ``{"accounts": [...]}``, optionally encrypted as
one Fernet token with the keys in ``key_file`` (one a line, newest first).
A file that cannot be used at all raises :class:`AccountsFileError`; an
entry that is wrong is dropped with a :class:`Problem` and the others load.
"""

import json
import os
import re
import stat
import sys
import zlib

import attr

from fido_tx import boundedfile, errors

SECURITY_DEFAULT_PORTS = {"tls": 993, "starttls": 143, "none": 143}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class OAuth:
    """An OAuth2 grant (the account's ``oauth`` object).  With a
    ``refresh_token`` the refresh-token grant, without one client credentials.
    Secrets are never shown by ``repr``."""

    provider: str = "generic"
    tenant: str = ""
    client_id: str = ""
    client_secret: str = attr.ib(default="", repr=False)
    refresh_token: str = attr.ib(default="", repr=False)
    scope: str = ""
    token_url: str = ""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Account:
    """One mailbox to fetch from.  Frozen: a change is a new value.

    The fields common to every source come first; ``source`` names the
    source (:mod:`fido_tx.sources`) that reads it, and the source-specific
    fields (IMAP: ``host`` .. ``idle``; Graph: ``user``, ``graph_endpoint``)
    have defaults, so that a source requires only what it uses (the parser
    checks that per source).  Secrets are never shown by ``repr`` or ``str``.
    """

    id: str
    host: str = ""
    username: str = ""
    password: str = attr.ib(default="", repr=False)
    port: int = 993
    #: "tls" (implicit), "starttls" (required upgrade) or "none" (explicit plain)
    security: str = "tls"
    mailbox: str = "INBOX"
    #: "seen", "delete" or "move:FOLDER"
    after_fetch: str = "seen"
    #: extra trust root (PEM path) for this account's server certificate
    ca_file: str | None = None
    #: "login" (LOGIN), "plain" (AUTHENTICATE PLAIN), "xoauth2", "oauthbearer"
    auth: str = "login"
    #: which source reads this account: a name in :data:`fido_tx.sources.SOURCES`
    source: str = "imap"
    #: the ``[delivery.NAME]`` table of fido.toml its messages go to
    delivery: str = "default"
    #: "unseen" (UNSEEN messages) or "new" (every UID above the last stored)
    select: str = "unseen"
    #: "all", or "now": take only mail that arrives after the first session
    start_from: str = "all"
    #: hold the connection and use IDLE where the server offers it
    idle: bool = True
    #: the OAuth2 grant for xoauth2/oauthbearer and Graph (:class:`OAuth`)
    oauth: OAuth | None = None
    #: Graph: the mailbox (UPN or id) whose folder is read
    user: str | None = None
    #: Graph: the service's base URL, without the version
    graph_endpoint: str = "https://graph.microsoft.com"

    @property
    def move_target(self):
        """The folder of ``move:FOLDER``, else ``None``."""
        if self.after_fetch.startswith("move:"):
            return self.after_fetch[len("move:"):]
        return None


#: what an account id may contain (it is part of Redis keys and log lines)
ID_RE = re.compile(r"\A[A-Za-z0-9._@+-]{1,200}\Z")
SECURITIES = ("tls", "starttls", "none")
AUTHS = ("login", "plain", "xoauth2", "oauthbearer")
OAUTH_AUTHS = ("xoauth2", "oauthbearer")
#: what each source requires beyond ``id``
REQUIRED = {"imap": ("host", "username", "password"), "memory": (), "graph": ("user", "oauth")}
SELECTS = ("unseen", "new")
START_FROMS = ("all", "now")
OAUTH_PROVIDERS = ("microsoft", "google", "generic")
FIELDS = frozenset(f.name for f in attr.fields(Account))
OAUTH_FIELDS = frozenset(f.name for f in attr.fields(OAuth))
_NAME_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_HOST_RE = re.compile(r"\A[^\s/\\@\x00-\x1f\x7f]{1,253}\Z")


class AccountsFileError(errors.OneLineError):
    """The accounts file (or its key file) cannot be used at all.

    ``str()`` is one line naming the file and what is wrong.
    """


class KeyFileError(AccountsFileError):
    """The key file is missing, unreadable or holds no valid Fernet key."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Problem:
    """Why one entry of the accounts file was dropped.

    ``account_id`` is ``None`` when the entry has no usable id; ``index`` is
    the entry's position (0-based) in the ``accounts`` list.  The message
    never contains a password.
    """

    account_id: str | None
    field: str | None
    message: str
    index: int | None = None

    def __str__(self):
        if self.account_id is not None:
            where = f"account {self.account_id}"
        elif self.index is not None:
            where = f"accounts[{self.index}] (no valid id)"
        else:
            where = "account with no valid id"
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LoadResult:
    accounts: tuple = ()
    problems: tuple = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AccountsDiff:
    """How a new account set differs from an old one, keyed by id.

    ``removed`` holds the old values; ``added``, ``changed`` and
    ``unchanged`` hold the new values.
    """

    added: tuple = ()
    removed: tuple = ()
    changed: tuple = ()
    unchanged: tuple = ()

    @property
    def empty(self):
        """True when nothing was added, removed or changed."""
        return not (self.added or self.removed or self.changed)


# -- keys and encryption ---------------------------------------------------


def generate_key():
    """A new Fernet key (urlsafe base64 bytes, no newline)."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key()


def read_keys(key_file):
    """The Fernet keys in ``key_file``, newest (first line) first.

    Blank lines and ``#`` comments are ignored.  Raises :class:`KeyFileError`.
    cryptography is imported here, not with the module: a daemon whose
    accounts file is not encrypted never loads it.
    """
    from cryptography.fernet import Fernet

    try:
        data = boundedfile.read_regular(key_file, boundedfile.MAX_KEY_BYTES, "key file")
    except OSError as e:
        raise KeyFileError(f"{key_file}: cannot read key file: {e.strerror or e}") from None
    keys = []
    for number, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            Fernet(line)
        except (ValueError, TypeError):
            raise KeyFileError(
                f"{key_file}: line {number} is not a Fernet key"
                " (32 url-safe base64-encoded bytes; make one with fido keygen)"
            ) from None
        keys.append(line)
    if not keys:
        raise KeyFileError(f"{key_file}: key file holds no key (make one with fido keygen)")
    return tuple(keys)


def _fernet(key_file):
    from cryptography.fernet import Fernet, MultiFernet

    return MultiFernet([Fernet(k) for k in read_keys(key_file)])


def encrypt_bytes(data, key_file):
    """``data`` encrypted as one Fernet token with the newest key of ``key_file``."""
    return _fernet(key_file).encrypt(bytes(data))


def decrypt_bytes(token, key_file, source="input"):
    """Decrypt one Fernet token with any key of ``key_file``.

    Raises :class:`AccountsFileError` naming ``source`` when no key fits or
    the token is truncated or garbage.
    """
    from cryptography.fernet import InvalidToken

    fernet = _fernet(key_file)
    token = bytes(token).strip()
    try:
        return fernet.decrypt(token)
    except InvalidToken:
        pass
    if token[:1] in (b"{", b"["):
        hint = (
            "it looks like plain JSON: set key_file = \"\" in fido.toml,"
            " or encrypt it with fido encrypt"
        )
    elif not token.startswith(b"gAAAAA"):
        hint = "it is not a Fernet token"
    else:
        hint = "wrong key, or the token is truncated or damaged"
    raise AccountsFileError(f"{source}: cannot decrypt with the keys in {key_file}: {hint}")


# -- loading ---------------------------------------------------------------


def load_accounts(path, key_file="", base_dir=None):
    """Read, decrypt (when ``key_file``) and validate the accounts file.

    :param base_dir: directory relative ``ca_file`` paths are resolved
        against; the accounts file's directory by default (pass the original
        directory when loading a cached copy).
    :returns: :class:`LoadResult`; entries with problems are left out.
    :raises AccountsFileError: the file as a whole is unusable.
    """
    path = os.path.abspath(path)
    try:
        data = boundedfile.read_regular(path, boundedfile.MAX_ACCOUNTS_BYTES, "accounts file")
    except IsADirectoryError:
        raise AccountsFileError(f"{path}: is a directory, not an accounts file") from None
    except boundedfile.FileRefused as e:
        raise AccountsFileError(f"{path}: {e}") from None
    except OSError as e:
        raise AccountsFileError(f"{path}: cannot read accounts file: {e.strerror or e}") from None
    if base_dir is None:
        base_dir = os.path.dirname(path)
    return parse_accounts(data, path, key_file=key_file, base_dir=base_dir)


def parse_accounts(data, source="<accounts>", key_file="", base_dir=None):
    """Like :func:`load_accounts` for bytes already read; ``source`` names them."""
    if key_file:
        data = decrypt_bytes(data, key_file, source)
    elif bytes(data).strip().startswith(b"gAAAAA"):
        raise AccountsFileError(
            f"{source}: looks like an encrypted (Fernet) file but key_file is \"\"; set key_file"
        )
    if base_dir is None:
        base_dir = os.getcwd() if source.startswith("<") else os.path.dirname(source)
    try:
        text = bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AccountsFileError(f"{source}: not UTF-8 text (byte {e.start})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise AccountsFileError(
            f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except (ValueError, RecursionError) as e:
        raise AccountsFileError(f"{source}: invalid JSON: {str(e)[:100]}") from None
    return parse_document(document, source, base_dir)


def parse_document(document, source="<accounts>", base_dir=""):
    """Validate the decoded JSON document ``{"accounts": [...]}``."""
    shape = 'expected {"accounts": [...]}'
    if not isinstance(document, dict):
        raise AccountsFileError(f"{source}: {shape}, got a JSON {_json_type(document)}")
    if "accounts" not in document:
        raise AccountsFileError(f'{source}: {shape}: no "accounts" key')
    extra = sorted(k for k in document if k != "accounts")
    if extra:
        raise AccountsFileError(
            f"{source}: {shape}: unknown top-level key " + ", ".join(map(repr, extra))[:200]
        )
    entries = document["accounts"]
    if not isinstance(entries, list):
        raise AccountsFileError(
            f'{source}: {shape}: "accounts" is a JSON {_json_type(entries)}, not a list'
        )
    seen = set()
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            if entry["id"] in seen:
                raise AccountsFileError(
                    f"{source}: duplicate account id {_short(entry['id'])}"
                )
            seen.add(entry["id"])
    accounts = []
    problems = []
    for index, entry in enumerate(entries):
        result = parse_account(entry, base_dir, index)
        if isinstance(result, Problem):
            problems.append(result)
        else:
            accounts.append(result)
    return LoadResult(tuple(accounts), tuple(problems))


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Bad(Exception):
    def __init__(self, field, message):
        super().__init__(field, message)
        self.field = field
        self.message = message


def parse_account(entry, base_dir="", index=None):
    """One entry -> :class:`Account`, or the first :class:`Problem` found."""
    if not isinstance(entry, dict):
        return Problem(None, None, f"expected a JSON object, got a {_json_type(entry)}", index)
    raw_id = entry.get("id")
    account_id = raw_id if isinstance(raw_id, str) and ID_RE.match(raw_id) else None
    try:
        return _build_account(entry, base_dir)
    except _Bad as bad:
        return Problem(account_id, bad.field, bad.message, index)


def _string(entry, field, required=False, default=None):
    if field not in entry:
        if required:
            raise _Bad(field, "missing (required)")
        return default
    value = entry[field]
    if not isinstance(value, str):
        raise _Bad(field, f"expected a string, got a {_json_type(value)}")
    return value


def _no_controls(field, value, secret=False):
    if _CONTROL_RE.search(value):
        raise _Bad(
            field,
            "contains a control character (line break, NUL, ...)"
            + ("" if secret else f": {_short(value)}"),
        )


def _build_account(entry, base_dir):
    unknown = sorted(k for k in entry if k not in FIELDS)
    if unknown:
        # Name the field, never its value (it might be a misspelt password).
        name = unknown[0]
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name):
            name = _short(name, 40)
        raise _Bad(name, "unknown field")
    if "id" not in entry:
        raise _Bad("id", "missing (required)")
    account_id = _string(entry, "id", required=True)
    if not ID_RE.match(account_id):
        raise _Bad(
            "id",
            "must be 1 to 200 characters of A-Z a-z 0-9 . _ @ + -,"
            f" got {_short(account_id)}",
        )
    source = _string(entry, "source", default="imap")
    if source not in REQUIRED:
        raise _Bad("source", f'must be "imap" or "graph", got {_short(source)}')
    auth = _string(entry, "auth", default="login")
    if auth not in AUTHS:
        raise _Bad("auth", "must be " + ", ".join(f'"{a}"' for a in AUTHS) + f", got {_short(auth)}")
    required = REQUIRED[source]
    if source == "imap" and auth in OAUTH_AUTHS:
        required = ("host", "username", "oauth")
    for field in required:
        if field not in entry:
            raise _Bad(field, "missing (required)" + ("" if source == "imap" else f" for source {source!r}"))
    fields = dict(id=account_id, source=source, auth=auth)
    fields.update(_imap_fields(entry, base_dir, source))
    fields.update(_common_fields(entry))
    fields["oauth"] = _oauth(entry)
    if auth in OAUTH_AUTHS and fields["oauth"] is None:
        raise _Bad("oauth", f"auth {auth!r} needs an oauth object")
    user = _nonempty(entry, "user")
    if user is not None:
        fields["user"] = user
    endpoint = _string(entry, "graph_endpoint")
    if endpoint is not None:
        _no_controls("graph_endpoint", endpoint)
        _https("graph_endpoint", endpoint)
        fields["graph_endpoint"] = endpoint.rstrip("/")
    if source == "graph" and "mailbox" not in entry:
        fields["mailbox"] = "Inbox"
    for name in _SHARED_TEXT:
        if type(fields.get(name)) is str:
            fields[name] = sys.intern(fields[name])
    return Account(**fields)


#: text fields most accounts of a file share (one server, one mailbox name):
#: one string each for all of them, not one per account from ``json.loads``
#: (issue 15: the memory of 10,000 configured accounts).  Never a secret.
_SHARED_TEXT = ("host", "security", "mailbox", "after_fetch", "ca_file", "auth", "source",
                "delivery", "select", "start_from", "graph_endpoint")


def _nonempty(entry, field):
    """A text field that, when present, is not empty and has no control
    characters; ``None`` when absent."""
    value = _string(entry, field)
    if value is not None:
        if not value:
            raise _Bad(field, "must not be empty")
        _no_controls(field, value)
    return value


def _imap_fields(entry, base_dir, source):
    out = {}
    host = _string(entry, "host")
    if host is not None:
        if not _HOST_RE.match(host):
            raise _Bad("host", f"must be a host name or IP address, got {_short(host)}")
        out["host"] = host
    username = _nonempty(entry, "username")
    if username is not None:
        out["username"] = username
    password = _string(entry, "password")
    if password is not None:
        _no_controls("password", password, secret=True)
        out["password"] = password

    security = _string(entry, "security", default="tls")
    if security not in SECURITIES:
        raise _Bad("security", f'must be "tls", "starttls" or "none", got {_short(security)}')
    port = entry.get("port", SECURITY_DEFAULT_PORTS[security])
    if isinstance(port, bool) or not isinstance(port, int):
        raise _Bad("port", f"expected an integer, got a {_json_type(port)}: {_short(port)}")
    if not 1 <= port <= 65535:
        raise _Bad("port", f"must be from 1 to 65535, got {port}")
    out.update(security=security, port=port)

    ca_file = entry.get("ca_file")
    if ca_file is not None:
        if not isinstance(ca_file, str):
            raise _Bad("ca_file", f"expected a string (a path) or null, got a {_json_type(ca_file)}")
        if not ca_file:
            raise _Bad("ca_file", "must not be empty (use null or leave it out)")
        _no_controls("ca_file", ca_file)
        out["ca_file"] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(ca_file)))
    idle = entry.get("idle", True)
    if not isinstance(idle, bool):
        raise _Bad("idle", f"expected true or false, got a {_json_type(idle)}")
    out["idle"] = idle
    return out


def _common_fields(entry):
    mailbox = _string(entry, "mailbox", default="INBOX")
    if not mailbox:
        raise _Bad("mailbox", "must not be empty")
    _no_controls("mailbox", mailbox)

    after_fetch = _string(entry, "after_fetch", default="seen")
    if after_fetch.startswith("move:"):
        folder = after_fetch[len("move:"):]
        if not folder:
            raise _Bad("after_fetch", 'move needs a folder: "move:FOLDER"')
        _no_controls("after_fetch", folder)
        if folder == mailbox:
            raise _Bad("after_fetch", f"cannot move into the fetched mailbox itself ({_short(folder)})")
    elif after_fetch not in ("seen", "delete"):
        raise _Bad(
            "after_fetch", f'must be "seen", "delete" or "move:FOLDER", got {_short(after_fetch)}'
        )
    out = dict(mailbox=mailbox, after_fetch=after_fetch)
    for field, choices in (("select", SELECTS), ("start_from", START_FROMS)):
        value = _string(entry, field, default=choices[0])
        if value not in choices:
            raise _Bad(field, " or ".join(f'"{c}"' for c in choices) + f" expected, got {_short(value)}")
        out[field] = value
    delivery = _string(entry, "delivery", default="default")
    if not _NAME_RE.match(delivery):
        raise _Bad("delivery", f"must name a [delivery.NAME] table, got {_short(delivery)}")
    out["delivery"] = delivery
    return out


def _https(field, url):
    from fido_tx.httpclient import check_url

    try:
        check_url(url, field)
    except ValueError as e:
        raise _Bad(field, str(e).split(": ", 1)[1]) from None


def _oauth(entry):
    value = entry.get("oauth")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Bad("oauth", f"expected a JSON object, got a {_json_type(value)}")
    unknown = sorted(k for k in value if k not in OAUTH_FIELDS)
    if unknown:
        name = unknown[0] if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", unknown[0]) else "?"
        raise _Bad(f"oauth.{name}", "unknown field")
    fields = {}
    for key in OAUTH_FIELDS:
        if key in value:
            if not isinstance(value[key], str):
                raise _Bad(f"oauth.{key}", f"expected a string, got a {_json_type(value[key])}")
            _no_controls(f"oauth.{key}", value[key], secret=key in ("client_secret", "refresh_token"))
            fields[key] = value[key]
    provider = fields.get("provider", "generic")
    if provider not in OAUTH_PROVIDERS:
        raise _Bad("oauth.provider", '"microsoft", "google" or "generic" expected, got '
                   + _short(provider))
    if not fields.get("client_id"):
        raise _Bad("oauth.client_id", "missing (required)")
    if provider == "generic" and not fields.get("token_url"):
        raise _Bad("oauth.token_url", "missing (required for provider \"generic\")")
    if fields.get("token_url"):
        _https("oauth.token_url", fields["token_url"])
    return OAuth(**fields)


# -- sets ------------------------------------------------------------------


def diff_accounts(old, new):
    """Compare two account sets by id -> :class:`AccountsDiff`.

    Order follows ``new`` (``removed``: ``old``).  When an id repeats in one
    input, its last value counts.
    """
    old_by_id = {a.id: a for a in old}
    new_by_id = {a.id: a for a in new}
    added, changed, unchanged = [], [], []
    for account_id, account in new_by_id.items():
        before = old_by_id.get(account_id)
        if before is None:
            added.append(account)
        elif before == account:
            unchanged.append(account)
        else:
            changed.append(account)
    removed = [a for i, a in old_by_id.items() if i not in new_by_id]
    return AccountsDiff(tuple(added), tuple(removed), tuple(changed), tuple(unchanged))


def in_shard(account_id, shard="1/1"):
    """True when ``account_id`` belongs to shard ``"k/n"``.

    Stable across processes, machines and Python versions: the CRC-32 of the
    UTF-8 id, modulo n, equals k-1.  ``ValueError`` for a bad shard.
    """
    from fido_tx.config import parse_shard

    k, n = parse_shard(shard)
    return zlib.crc32(account_id.encode("utf-8")) % n == k - 1


def insecure_permissions(path):
    """True when group or others may read ``path`` (warn about it).

    False when the file cannot be examined (the reader reports that).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))
