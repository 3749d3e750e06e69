"""OAuth2 access tokens for IMAP (XOAUTH2, OAUTHBEARER) and Microsoft Graph.

An account's ``oauth`` object names a *grant*: with a ``refresh_token`` the
refresh-token grant (Google, Microsoft delegated access), without one the
client-credentials grant (Microsoft app-only access).  One
:class:`TokenProvider` serves each grant (key: token URL, client id, client
secret, refresh token and scope), shared by every account that uses it, so
a thousand mailboxes of one tenant cost one token request an hour:

* a token is reused until ``REFRESH_MARGIN`` before it expires (at most a
  fifth of its lifetime), then refreshed; callers that ask while a refresh
  is under way wait for that one request;
* ``invalidate(token)`` (the server refused it) drops it, so the next caller
  fetches a fresh one; a second account refusing the same token does not
  cause a second request;
* ``invalid_grant`` (revoked consent, expired or rotated-away refresh token,
  changed password) is the error kind ``reauthorize``: logged once, and the
  grant is not asked again for ``reauthorize_hold`` seconds (no retry storm
  against the identity platform); other failures are held for
  ``failure_hold`` seconds so that concurrent accounts share one answer.

Microsoft rotates refresh tokens: each answer may carry a new one, which
replaces the old.  The newest is kept in :class:`RefreshTokenStore` (a file
in the state directory, mode 0600, Fernet-encrypted with the accounts key
file when there is one), keyed by a digest of the grant as the accounts
file states it; the accounts file itself is never rewritten.  When the web
application writes a new refresh token into the accounts file (a person
signed in again), the key changes and the new token is used.
"""

import base64
import hashlib
import json
import os
from urllib.parse import quote, quote_plus, urlencode, urlsplit

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fido_tx import errors
from fido_tx.credentials import sasl
from fido_tx.httpclient import check_url
from fido_tx.interfaces import ICredentials

MICROSOFT_TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
#: refresh this long before expiry (or at 80 % of a shorter lifetime)
REFRESH_MARGIN = 300.0
#: a token endpoint answer (JSON) is read up to this many bytes
MAX_TOKEN_ANSWER = 64 * 1024
STORE_NAME = "oauth-refresh-tokens.json"

log = Logger()


def token_url(oauth):
    """The token endpoint of ``oauth`` (``token_url`` overrides the provider's).

    :raises ValueError: one line, for a non-https URL off loopback.
    """
    if oauth.token_url:
        url = oauth.token_url
    elif oauth.provider == "microsoft":
        url = MICROSOFT_TOKEN_URL.format(tenant=quote(oauth.tenant or "common", safe=""))
    elif oauth.provider == "google":
        url = GOOGLE_TOKEN_URL
    else:
        raise ValueError("oauth.token_url: missing (required for provider \"generic\")")
    return check_url(url, "oauth.token_url")


def default_scope(account):
    """The scope to ask for when the account names none."""
    oauth = account.oauth
    if oauth.scope:
        return oauth.scope
    if oauth.provider == "google":
        return "https://mail.google.com/" if not oauth.refresh_token else ""
    app_only = not oauth.refresh_token
    if account.source == "graph":
        base = account.graph_endpoint.rstrip("/")
        return f"{base}/.default" if app_only else f"{base}/Mail.ReadWrite offline_access"
    if oauth.provider == "microsoft":
        if app_only:
            return "https://outlook.office365.com/.default"
        return "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access"
    return ""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Grant:
    """What one token provider asks for; equal grants share a provider."""

    token_url: str
    client_id: str
    client_secret: str = attr.ib(default="", repr=False)
    #: as the accounts file states it ("" = client-credentials grant)
    refresh_token: str = attr.ib(default="", repr=False)
    scope: str = ""

    @property
    def kind(self):
        return "refresh_token" if self.refresh_token else "client_credentials"

    @property
    def store_id(self):
        """Names the grant in the refresh-token store without revealing it."""
        material = "\0".join([self.token_url, self.client_id, self.refresh_token])
        return hashlib.sha256(material.encode("utf-8")).hexdigest()

    @property
    def host(self):
        return urlsplit(self.token_url).hostname or "?"


def grant_for(account):
    """The :class:`Grant` of ``account`` (``ValueError`` on a bad token URL)."""
    oauth = account.oauth
    return Grant(token_url(oauth), oauth.client_id, oauth.client_secret,
                 oauth.refresh_token, default_scope(account))


def secret_forms(secret):
    """``secret`` as it may appear: raw, URL-encoded, base64, JSON-escaped."""
    if not secret:
        return set()
    raw = secret.encode("utf-8")
    forms = {secret, quote(secret, safe=""), quote_plus(secret),
             base64.b64encode(raw).decode("ascii"),
             base64.urlsafe_b64encode(raw).decode("ascii"),
             json.dumps(secret)[1:-1]}
    return {f for f in forms if f}


class RefreshTokenStore:
    """The newest refresh token of each grant, kept over restarts.

    A JSON file ``{"refresh_tokens": {store_id: token}}``, written whole to a
    temporary file (mode 0600) and renamed over the old one; encrypted as
    one Fernet token when ``key_file`` is set.  A missing file is empty; an
    unreadable one is logged and treated as empty (the accounts file's
    tokens are used).
    """

    def __init__(self, path, key_file=""):
        self.path = path
        self.key_file = key_file
        self._tokens = None

    @classmethod
    def in_dir(cls, state_dir, key_file=""):
        return cls(os.path.join(state_dir, STORE_NAME + (".enc" if key_file else "")), key_file)

    def _load(self):
        if self._tokens is not None:
            return self._tokens
        self._tokens = {}
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return self._tokens
        except OSError as e:
            log.error("cannot read {path}: {why}; using the accounts file's refresh tokens",
                      path=self.path, why=e.strerror or str(e))
            return self._tokens
        try:
            if self.key_file:
                from fido_tx.accounts.model import decrypt_bytes

                data = decrypt_bytes(data, self.key_file, self.path)
            tokens = json.loads(data.decode("utf-8"))["refresh_tokens"]
            self._tokens = {str(k): str(v) for k, v in tokens.items()}
        except Exception as e:  # a damaged file must not stop fetching
            log.error("cannot use {path} ({why}); using the accounts file's refresh tokens",
                      path=self.path, why=type(e).__name__)
        return self._tokens

    def get(self, grant):
        """The newest refresh token of ``grant``, or its own."""
        return self._load().get(grant.store_id, grant.refresh_token)

    def put(self, grant, refresh_token):
        """Keep ``refresh_token`` as the newest of ``grant`` (written at once)."""
        tokens = dict(self._load())
        tokens[grant.store_id] = refresh_token
        self._tokens = tokens
        data = json.dumps({"refresh_tokens": tokens}, sort_keys=True).encode("utf-8")
        if self.key_file:
            from fido_tx.accounts.model import encrypt_bytes

            data = encrypt_bytes(data, self.key_file)
        directory = os.path.dirname(self.path) or "."
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            log.error("cannot write {path}: {why}; the rotated refresh token is kept in memory"
                      " only (fix the state directory)", path=self.path, why=e.strerror or str(e))
            return False
        return True


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Token:
    value: str = attr.ib(repr=False)
    refresh_at: float
    expires_at: float


class TokenProvider:
    """Access tokens of one :class:`Grant`, cached and refreshed; see the module."""

    def __init__(self, reactor, http, grant, store, failure_hold=30.0, reauthorize_hold=21600.0):
        self._reactor = reactor
        self._http = http
        self.grant = grant
        self._store = store
        self.failure_hold = failure_hold
        self.reauthorize_hold = reauthorize_hold
        self._token = None
        self._failure = None
        self._failure_until = 0.0
        self._waiting = []
        #: token requests sent (for tests and metrics)
        self.requests = 0
        self._seen_tokens = []

    def token(self):
        """Deferred firing with a valid access token (str); errbacks with a
        :class:`FidoError` (``reauthorize``, ``auth``, ``throttled``, ...)."""
        now = self._reactor.seconds()
        if self._token is not None and now < self._token.refresh_at:
            return defer.succeed(self._token.value)
        if self._failure is not None and now < self._failure_until:
            return defer.fail(self._failure)
        d = defer.Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            self._refresh()
        return d

    def invalidate(self, token=None):
        """The server refused ``token`` (or the current one): the next call fetches anew."""
        if self._token is not None and (token is None or token == self._token.value):
            self._token = None

    def lifetime(self, token):
        """``(refresh_at, expires_at)`` of ``token`` while it is the cached
        one, else ``None``."""
        current = self._token
        if current is None or current.value != token:
            return None
        return current.refresh_at, current.expires_at

    def forms(self):
        """Every secret this provider knows, in every encoding (for scrubbing)."""
        found = set()
        for secret in [self.grant.client_secret, self.grant.refresh_token,
                       self._store.get(self.grant)] + self._seen_tokens:
            found |= secret_forms(secret)
        return found

    def _refresh(self):
        self.requests += 1
        body = {"client_id": self.grant.client_id}
        if self.grant.client_secret:
            body["client_secret"] = self.grant.client_secret
        if self.grant.refresh_token:
            body.update(grant_type="refresh_token", refresh_token=self._store.get(self.grant))
        else:
            body["grant_type"] = "client_credentials"
        if self.grant.scope:
            body["scope"] = self.grant.scope
        headers = {b"Content-Type": [b"application/x-www-form-urlencoded"],
                   b"Accept": [b"application/json"]}
        d = self._http.request(b"POST", self.grant.token_url, headers=headers,
                               data=urlencode(body).encode("ascii"), max_body=MAX_TOKEN_ANSWER)
        d.addCallback(self._answered)
        d.addErrback(self._failed)
        d.addBoth(self._wake)

    def _answered(self, response):
        if response.code != 200:
            raise self._refusal(response)
        document = response.json(f"the token endpoint {self.grant.host}")
        access = document.get("access_token")
        if not isinstance(access, str) or not access:
            raise errors.FidoError(errors.PROTOCOL,
                                   f"the token endpoint {self.grant.host} sent no access_token")
        try:
            lifetime = float(document.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = 3600.0
        now = self._reactor.seconds()
        margin = min(REFRESH_MARGIN, lifetime / 5.0)
        self._token = _Token(access, now + lifetime - margin, now + lifetime)
        self._seen_tokens = (self._seen_tokens + [access])[-3:]
        self._failure = None
        rotated = document.get("refresh_token")
        if (self.grant.refresh_token and isinstance(rotated, str) and rotated
                and rotated != self._store.get(self.grant)):
            self._store.put(self.grant, rotated)
            log.info("OAuth2 refresh token of client {client_id} at {host} rotated; the newest"
                     " is kept in {path}", client_id=self.grant.client_id,
                     host=self.grant.host, path=self._store.path)
        return access

    def _refusal(self, response):
        try:
            document = response.json()
        except errors.FidoError:
            document = {}
        code = str(document.get("error", ""))[:60]
        described = str(document.get("error_description", ""))
        for form in self.forms():
            if len(form) >= 4:
                described = described.replace(form, "<redacted>")
        described = " ".join(described.split())[:300]
        where = f"the token endpoint {self.grant.host}"
        if code == "invalid_grant":
            return errors.FidoError(
                errors.REAUTHORIZE,
                f"{where} refused the grant of client {self.grant.client_id} (invalid_grant):"
                " the sign-in was revoked or expired; a person must sign in again and the"
                " application must write the new refresh token", debug=described)
        if response.code == 429:
            return errors.FidoError(errors.THROTTLED, f"{where} answered HTTP 429 (too many"
                                    " requests); retrying later", debug=described)
        if response.code >= 500:
            return errors.FidoError(errors.CONNECT, f"{where} answered HTTP {response.code};"
                                    " retrying later", debug=described)
        hint = {"invalid_client": "check oauth.client_id and oauth.client_secret",
                "unauthorized_client": "the application may not use this grant",
                "invalid_scope": "check oauth.scope", "invalid_request": "check the oauth object"}
        return errors.FidoError(
            errors.AUTH, f"{where} refused client {self.grant.client_id}: HTTP {response.code}"
            f" {code or 'error'}" + (f" ({hint[code]})" if code in hint else ""), debug=described)

    def _failed(self, failure):
        error = failure.value if failure.check(errors.FidoError) else errors.FidoError(
            errors.PROTOCOL, f"token request failed: {failure.type.__name__}")
        hold = self.reauthorize_hold if error.kind == errors.REAUTHORIZE else self.failure_hold
        first = self._failure is None or self._failure.kind != error.kind
        self._failure = error
        self._failure_until = self._reactor.seconds() + hold
        if error.kind == errors.REAUTHORIZE and first:
            log.warn("{problem}; not asking again for {hold:g} s", problem=error.message, hold=hold)
        elif first:
            log.info("token request failed: {problem}", problem=error.message)
        if failure.check(errors.FidoError):
            return failure
        raise error

    def _wake(self, result):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        return None


class Providers:
    """The token providers of a process: one per :class:`Grant`, shared.

    :param http: :class:`fido_tx.httpclient.HttpClient` for the token endpoints.
    :param store: :class:`RefreshTokenStore`.
    """

    def __init__(self, reactor, http, store, failure_hold=30.0, reauthorize_hold=21600.0):
        self._reactor = reactor
        self._http = http
        self._store = store
        self._holds = (failure_hold, reauthorize_hold)
        self._providers = {}
        #: the HttpClient when built by :func:`shared_providers` (closed there)
        self.http = None

    def for_grant(self, grant):
        provider = self._providers.get(grant)
        if provider is None:
            provider = TokenProvider(self._reactor, self._http, grant, self._store, *self._holds)
            self._providers[grant] = provider
        return provider

    def __len__(self):
        return len(self._providers)


@implementer(ICredentials)
class OAuthCredentials:
    """One account's view of its grant's provider (an ``ICredentials``)."""

    def __init__(self, provider, user="", host="", port=0):
        self.provider = provider
        self.user = user
        self.host = host
        self.port = port
        self._last = None

    def secret(self):
        d = self.provider.token()

        def keep(token):
            self._last = token
            return token

        return d.addCallback(keep)

    def invalidate(self):
        self.provider.invalidate(self._last)

    def lifetime(self):
        """``(refresh_at, expires_at)`` of the last token :meth:`secret` gave
        (``None`` before the first, or once it is no longer the cached one)."""
        return self.provider.lifetime(self._last) if self._last else None

    def secret_forms(self):
        forms = set(self.provider.forms())
        if self._last:
            forms |= secret_forms(self._last)
            if self.user:
                forms.add(sasl.xoauth2(self.user, self._last).decode("ascii"))
                if self.host:
                    forms.add(sasl.oauthbearer(self.user, self._last, self.host,
                                               self.port).decode("ascii"))
                forms.add(base64.b64encode(
                    f"auth=Bearer {self._last}".encode("utf-8")).decode("ascii"))
        return sorted(forms, key=len, reverse=True)


def for_account(account, providers):
    """The :class:`OAuthCredentials` of an account with an ``oauth`` grant.

    :raises ValueError: one line, when the grant's token URL is unusable.
    """
    if account.source == "graph":
        return OAuthCredentials(providers.for_grant(grant_for(account)), account.user or "")
    return OAuthCredentials(providers.for_grant(grant_for(account)), account.username,
                            account.host, account.port)


class _Shared:
    """The process's :class:`Providers`, one per (reactor, state dir, key file)."""

    providers = {}


def shared_providers(reactor, state_dir, key_file="", timeout=30.0):
    """The :class:`Providers` every account of this process shares (created on
    first use with its own HTTP pool; :func:`close_shared` on stop)."""
    key = (reactor, os.path.abspath(state_dir or "."), key_file or "")
    providers = _Shared.providers.get(key)
    if providers is None:
        from fido_tx.httpclient import HttpClient

        http = HttpClient(reactor, timeout=timeout, per_host=2)
        providers = Providers(reactor, http, RefreshTokenStore.in_dir(key[1], key_file))
        providers.http = http
        _Shared.providers[key] = providers
    return providers


def close_shared():
    """Close the HTTP pools of :func:`shared_providers` (service stop)."""
    shared, _Shared.providers = _Shared.providers, {}
    return defer.DeferredList([p.http.close() for p in shared.values()])


def build(account, ctx):
    """The credentials registry's factory (:data:`fido_tx.credentials.AUTHS`):
    ``ctx`` is the :class:`fido_tx.credentials.CredentialsContext` (its
    ``reactor``, ``state_dir`` and ``key_file``).

    :raises FidoError: kind ``config`` for an unusable token URL.
    """
    if ctx.reactor is None:
        # a wiring mistake, shown as the account's error rather than a crash
        # when the first token is due
        raise errors.FidoError(errors.CONFIG, "internal: OAuth2 credentials were built"
                               " without a reactor (CredentialsContext.reactor)")
    try:
        return for_account(account, shared_providers(ctx.reactor, ctx.state_dir, ctx.key_file))
    except ValueError as e:
        raise errors.FidoError(errors.CONFIG, str(e)) from None
