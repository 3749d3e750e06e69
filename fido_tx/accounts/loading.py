"""The blocking part of an accounts (re)load: read, decrypt, validate, shard filter, diff, save.

:meth:`ShardLoad.compute` may run in a worker thread (one load at a time):
it touches nothing the reactor thread uses but its own shard memo and the
:class:`~fido_tx.accounts.lastgood.LastGoodCopy` bookkeeping.  What it
computed comes back as one frozen :class:`Loaded` value.
"""

import time

import attr
from twisted.internet import defer

from fido_tx.accounts import model as accounts_mod
from fido_tx.accounts.lastgood import path_signature

__all__ = ["Loaded", "ShardLoad", "pick_runner", "run_inline"]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Loaded:
    """What the blocking part of a load computed."""

    result: object  # LoadResult
    accounts: tuple  # shard-filtered
    diff: object  # AccountsDiff against the set current when the load began
    timing: dict
    cache_warning: str | None = None  # why the bytes could not be cached
    cache_saved: bool = False  # the bytes are in the cache now
    signature: tuple | None = None  # the file's stat signature before loading


def run_inline(f, *args):
    """A ``run_blocking`` that runs ``f`` here and now (on the reactor thread)."""
    return defer.maybeDeferred(f, *args)


def _thread_runner(reactor):
    """A ``run_blocking`` on ``reactor``'s thread pool (created lazily)."""

    def run(f, *args):
        from twisted.internet import threads

        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def pick_runner(clock):
    """The reactor's thread pool when ``clock`` has one (the real reactor),
    else :func:`run_inline` (a ``task.Clock`` in tests)."""
    from twisted.internet.interfaces import IReactorThreads

    if IReactorThreads.providedBy(clock):
        return _thread_runner(clock)
    return run_inline


class ShardLoad:
    """Loads an accounts file and keeps this instance's shard of it.

    :param loader: ``loader(path, key_file, base_dir=None) -> LoadResult``,
        raising ``accounts.AccountsFileError``; None: ``load_accounts``.
    :param shard: ``"k/n"`` (a ValueError now when it is malformed).
    :param last_good: the :class:`LastGoodCopy` saved after each good load.
    """

    def __init__(self, loader, key_file, shard, last_good):
        self._loader = loader if loader is not None else accounts_mod.load_accounts
        self._key_file = key_file
        self.shard = shard
        accounts_mod.in_shard("x", shard)  # ValueError now, not at first load
        self._all_mine = shard.strip() == "1/1"
        self._memo = {}
        self._last_good = last_good

    def compute(self, path, old, base_dir=None):
        """Load ``path``, filter by shard, diff against ``old``, save the
        bytes (not when loading the last good copy itself: ``base_dir``
        given)."""
        started = time.perf_counter()
        from_cache = base_dir is not None
        sig = None if from_cache else path_signature(path)
        if base_dir is None:
            result = self._loader(path, self._key_file)
        else:
            result = self._loader(path, self._key_file, base_dir=base_dir)
        loaded = time.perf_counter()
        new = self._filter(result.accounts)
        diff = accounts_mod.diff_accounts(old, new)
        diffed = time.perf_counter()
        warning = None if from_cache else self._last_good.save(sig)
        saved = warning is None and self._last_good.holds(sig)
        done = time.perf_counter()
        timing = {
            "load": loaded - started,
            "diff": diffed - loaded,
            "cache": done - diffed,
            "blocking": done - started,
        }
        return Loaded(result, new, diff, timing, warning, saved, sig)

    def _filter(self, accounts):
        if self._all_mine:
            return tuple(accounts)
        memo, shard, mine = self._memo, self.shard, {}
        for a in accounts:
            m = memo.get(a.id)
            if m is None:
                m = accounts_mod.in_shard(a.id, shard)
            mine[a.id] = m
        self._memo = mine
        return tuple(a for a in accounts if mine[a.id])

    def mine(self, account_id):
        """The account ``account_id`` belongs to this instance's shard."""
        if self._all_mine:
            return True
        m = self._memo.get(account_id)
        if m is None:
            m = accounts_mod.in_shard(account_id, self.shard)
        return m
