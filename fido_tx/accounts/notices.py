"""What the operator is told about the accounts file: log lines, and one report per distinct problem.

Every line the live reload logs is here, with the memory of what was said
already: a whole-file problem is reported once until the file loads again
(a relapse is reported), a bad account once while it lasts, a cache or
permissions warning once per distinct warning.  Reports go to
``report(kind="config", message=..., account=...)``.
"""

import os

from twisted.logger import Logger

from fido_tx.accounts.model import insecure_permissions

__all__ = ["AccountsNotices", "CONFIG"]

CONFIG = "config"


def _ms(seconds):
    return round(seconds * 1000.0, 1)


class AccountsNotices:
    """Logs and reports for one accounts file.

    :param mine: ``mine(account_id) -> bool``: problems of accounts in other
        shards are left to the instance that owns them.
    """

    def __init__(self, path, cache_path, key_file, report, mine):
        # The namespace log lines have always shown for the live reload.
        self.log = Logger(namespace="fido_tx.accounts.reload.AccountsSource")
        self._path = path
        self._cache_path = cache_path
        self._key_file = key_file
        self._report = report
        self._mine = mine
        self._file_problem = None  # the whole-file problem reported last
        self._account_problems = frozenset()
        self._cache_warned = None
        self._permissions_warned = None

    # -- the whole file

    def missing_at_start(self):
        self.log.warn(
            "accounts file {path} does not exist yet: running with no "
            "accounts until the web application writes it",
            path=self._path,
        )

    def unusable_at_start(self, problem, saved):
        self._file_problem = problem
        message = (f"{problem}; running with the last good copy of the accounts "
                   f"from {saved} ({self._cache_path}) until the file is fixed")
        self.log.error("ACCOUNTS FILE UNUSABLE AT START: {message}", message=message)
        self.send(message, None)

    def retrying(self, delay, problem):
        self.log.info(
            "accounts file unusable, trying again in {delay} s "
            "(it may be half written): {problem}",
            delay=delay, problem=problem,
        )

    def unusable(self, problem, kept, count):
        """Still bad after the retry: error and report once per problem."""
        if problem != self._file_problem:
            self._file_problem = problem
            self.log.error(
                "accounts file not applied, keeping {kept} ({count} accounts): {problem}",
                kept=kept, count=count, problem=problem,
            )
            self.send(f"{problem}; keeping {kept} of {count} accounts", None)
        else:
            self.log.warn(
                "accounts file still unusable, keeping {kept} ({count} accounts): "
                "{problem}", kept=kept, count=count, problem=problem,
            )

    def usable_again(self, had_problem, was_cached):
        if had_problem:
            self.log.info("accounts file {path} is usable again", path=self._path)
        if was_cached:
            self.log.info("no longer running on the last good copy of the accounts")
        self._file_problem = None

    # -- one load

    def cache(self, loaded):
        """Whether the last good copy could be saved, said on change."""
        if loaded.cache_saved and self._cache_warned is not None:
            self.log.info("the last good copy of the accounts is saved to {cache} again",
                          cache=self._cache_path)
            self._cache_warned = None
        elif loaded.cache_warning is not None and loaded.cache_warning != self._cache_warned:
            self._cache_warned = loaded.cache_warning
            self.log.warn(
                "cannot save the last good copy of the accounts to {cache}: "
                "{error}; a bad accounts file at the next start will stop Fido",
                cache=self._cache_path, error=loaded.cache_warning,
            )

    def account_problems(self, problems, from_cache):
        """Each bad account of this shard, left out: said once while it lasts."""
        source = self._cache_path if from_cache else self._path
        keys = {}
        for p in problems:
            if p.account_id is None or self._mine(p.account_id):
                keys.setdefault(str(p), p)
        for key, p in keys.items():
            if key in self._account_problems:
                continue
            self.log.error(
                "accounts file {path}: {problem}; this account is left out "
                "until it is fixed", path=source, problem=key,
                account_id=p.account_id, field=p.field,
            )
            self.send(f"{source}: {key}; this account is left out", p.account_id)
        self._account_problems = frozenset(keys)

    def permissions(self):
        """Warn once per file and mode when the key file, or a plain accounts
        file (it holds passwords in clear), can be read by group or others."""
        secret = self._key_file if self._key_file else self._path
        what = "key file" if self._key_file else "plain accounts file (passwords in clear)"
        try:
            mode = os.stat(secret).st_mode & 0o777
        except OSError:
            return
        if not insecure_permissions(secret):
            self._permissions_warned = None
            return
        if self._permissions_warned == (secret, mode):
            return
        self._permissions_warned = (secret, mode)
        self.log.warn(
            "the {what} {path} can be read by group or others (mode {mode:o}): "
            "chmod 600 it{hint}",
            what=what, path=secret, mode=mode,
            hint="" if self._key_file else ", or encrypt it (fido keygen, fido encrypt)",
        )

    def unchanged(self, total):
        self.log.debug("accounts file {path} reloaded: no change ({total} accounts)",
                       path=self._path, total=total)

    def applied(self, initial, from_cache, diff, total, seconds):
        self.log.info(
            "accounts {verb} from {path}: {added} added, {removed} removed, "
            "{changed} changed, {total} total in {ms} ms",
            verb="loaded" if initial else "reloaded",
            path=self._cache_path if from_cache else self._path,
            added=len(diff.added), removed=len(diff.removed),
            changed=len(diff.changed), total=total, ms=_ms(seconds),
        )

    def send(self, message, account):
        if self._report is None:
            return
        try:
            self._report(kind=CONFIG, message=message, account=account)
        except Exception:
            self.log.failure("reporting an accounts problem failed")
