"""Per-account retry backoff: pure functions over frozen values.

After a failed session an account waits longer before its next one:
``initial * 2 ** (failures - 1)`` seconds, capped at ``maximum``, spread by a
random +/- ``jitter`` fraction (so that accounts failing together, e.g. when
one server is down, do not retry in lockstep).  Authentication failures use
the longer ``auth_initial`` / ``auth_maximum`` schedule: retrying a wrong
password every few seconds gets accounts locked by their providers.

:func:`exponential` is the ONE backoff formula of Fido: the accounts here,
the Redis reconnects (:mod:`fido_tx.redis.connection`) and the error-report
retries (:mod:`fido_tx.observe.report`) all wait that long.

A ``throttled`` session that carries a Retry-After waits that long instead
(at most ``maximum``).  A success resets the count.  A ``redis`` failure is not the account's fault
(the sink is down; the scheduler is paused globally for that), so it neither
counts as a failure nor resets the count.
"""

import attr

from fido_tx import errors

#: exponents above this no longer change a capped delay; keeps floats finite
_MAX_EXPONENT = 60


@attr.s(frozen=True, slots=True, auto_attribs=True)
class BackoffState:
    """An account's failure streak."""

    #: consecutive failed sessions that count (0 = healthy)
    failures: int = 0
    #: kind of the last counted failure (``None`` when healthy)
    last_kind: str | None = None


HEALTHY = BackoffState()


def counts_as_failure(kind):
    """True when a session ending with ``kind`` should back the account off."""
    return kind is not None and kind != errors.REDIS


def record(state, kind):
    """The state after a session that ended with ``kind`` (``None`` = success)."""
    if kind is None:
        return HEALTHY
    if not counts_as_failure(kind):
        return state
    return BackoffState(failures=state.failures + 1, last_kind=kind)


def exponential(attempt, initial, maximum, jitter, random):
    """Seconds before retry ``attempt`` (1, 2, ...): ``initial * 2 **
    (attempt - 1)`` capped at ``maximum``, spread by +/- ``jitter`` (a
    fraction) and never over ``maximum`` nor below 0.  ``random`` is a
    :class:`random.Random` (tests pass a seeded one); 0 for ``attempt < 1``."""
    if attempt < 1:
        return 0.0
    exponent = min(attempt - 1, _MAX_EXPONENT)
    base = float(min(initial * 2.0**exponent, maximum))
    jitter = max(0.0, float(jitter))
    value = base * random.uniform(1.0 - jitter, 1.0 + jitter) if jitter else base
    return max(0.0, min(value, float(maximum)))


def schedule(settings, state):
    """``(initial, maximum)`` seconds for the state's last failure kind."""
    if state.last_kind in (errors.AUTH, errors.REAUTHORIZE):
        return settings.auth_initial, settings.auth_maximum
    return settings.initial, settings.maximum


def base_delay(settings, state):
    """The delay without jitter: 0 when healthy, else exponential and capped."""
    if state.failures <= 0:
        return 0.0
    initial, maximum = schedule(settings, state)
    exponent = min(state.failures - 1, _MAX_EXPONENT)
    return float(min(initial * 2.0**exponent, maximum))


def delay(settings, state, random, retry_after=None):
    """Seconds to wait before the next session: :func:`base_delay` with jitter.

    The jittered value lies in ``base * (1 +/- jitter)`` and never exceeds the
    schedule's maximum (nor drops below 0).  ``random`` is a
    :class:`random.Random` (a parameter, so tests are deterministic).

    ``retry_after`` (seconds the other side asked for: a ``throttled``
    session's Retry-After) replaces the formula: that long exactly, never
    more than the schedule's maximum.
    """
    initial, maximum = schedule(settings, state)
    if retry_after is not None:
        return max(0.0, min(float(retry_after), float(maximum)))
    return exponential(state.failures, initial, maximum, settings.jitter, random)
