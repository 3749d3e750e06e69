"""The status rules as pure functions (fido_tx.observe.transitions), on any sequence of results."""

from hypothesis import given, settings as hsettings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

import attr

from fido_tx import errors
from fido_tx.observe.transitions import (
    OK,
    changed_fields,
    next_status,
    report_for,
    status_from_hash,
)
from fido_tx.outcome import SessionResult
from fido_tx.timefmt import iso_utc

KINDS = [None, None, errors.AUTH, errors.CONNECT, errors.TIMEOUT, errors.REDIS]

results = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(min_value=0, max_value=3),
              st.integers(min_value=1, max_value=600)),
    max_size=30,
)


def result(kind, fetched):
    if kind is None:
        return SessionResult(account_id="a", fetched=fetched)
    return SessionResult(account_id="a", kind=kind, message=f"{kind} went wrong")


def run(sequence, start=1_700_000_000.0):
    """Feed the results through the rules as the tracker does; returns the
    statuses after each result and the reports sent ``(kind, message)``."""
    status, now, statuses, reports = None, start, [], []
    for kind, fetched, gap in sequence:
        now += gap
        r = result(kind, fetched)
        new = next_status(status, r, now)
        report = report_for(status, new, r, "imap.example.com:993")
        if report is not None:
            new = attr.evolve(new, reported=OK if report[0] == errors.RECOVERED else report[0])
            reports.append(report[:2])
        statuses.append((now, new))
        status = new
    return statuses, reports


class TransitionTests(SynchronousTestCase):
    @hsettings(max_examples=100, deadline=None)
    @given(results)
    def test_a_report_exactly_when_what_the_web_application_was_told_changes(self, sequence):
        told, expected = OK, []
        for kind, _fetched, _gap in sequence:
            if kind == errors.REDIS:
                continue  # the sink's problem: reported once for the instance
            if kind is None:
                if told != OK:
                    expected.append(errors.RECOVERED)
                told = OK
            elif told != kind:
                expected.append(kind)
                told = kind
        _statuses, reports = run(sequence)
        self.assertEqual([kind for kind, _message in reports], expected)

    @hsettings(max_examples=100, deadline=None)
    @given(results)
    def test_the_failure_streak_counts_account_failures_and_a_redis_result_leaves_it(
            self, sequence):
        streak, first, fetched = 0, None, 0
        statuses, _reports = run(sequence)
        for (kind, n, _gap), (now, status) in zip(sequence, statuses):
            fetched += n if kind is None else 0
            if kind is None:
                streak, first = 0, None
            elif kind != errors.REDIS:
                streak += 1
                first = now if first is None else first
            self.assertEqual(status.failures, streak)
            self.assertEqual(status.failing_since, first)
            self.assertEqual(status.state, OK if kind is None else kind)
            self.assertEqual(status.fetched_total, fetched)

    def test_recovered_says_from_what_and_since_when(self):
        statuses, reports = run([(errors.AUTH, 0, 10), (errors.AUTH, 0, 60), (None, 2, 60)])
        self.assertEqual(reports[-1], (errors.RECOVERED, "recovered from auth: auth went wrong"))
        old, new = statuses[1][1], statuses[2][1]
        _kind, _message, debug = report_for(old, new, result(None, 2), "imap.example.com:993")
        self.assertIn("server: imap.example.com:993", debug)
        self.assertIn(f"failing since: {iso_utc(statuses[0][0])} (2 failed session(s))", debug)

    def test_the_hash_gets_failing_since_and_reported_only_when_they_change(self):
        statuses, _reports = run([(errors.AUTH, 0, 10), (errors.AUTH, 0, 60), (None, 1, 60)])
        first, second, third = (s for _now, s in statuses)
        self.assertEqual(changed_fields(None, first),
                         {"failing_since": iso_utc(first.failing_since), "reported": "auth"})
        self.assertIsNone(changed_fields(first, second))
        self.assertEqual(changed_fields(second, third), {"failing_since": "", "reported": OK})

    def test_a_hash_from_before_reported_existed_counts_its_error_as_reported(self):
        status = status_from_hash({"state": "error", "last_error_kind": "auth",
                                   "last_error": "no", "failing_since": iso_utc(1000.0)}, 5000.0)
        self.assertEqual((status.state, status.reported, status.failures), ("auth", "auth", 1))
        self.assertEqual(status.failing_since, 1000.0)
        again = next_status(status, result(errors.AUTH, 0), 6000.0)
        self.assertIsNone(report_for(status, again, result(errors.AUTH, 0), ""))


def _next_status_by_evolve(old, result, now):
    """The rule as it was written with ``attr.evolve`` (the reference)."""
    from fido_tx.observe.transitions import AccountStatus

    state = OK if result.ok else result.kind
    if old is None:
        old = AccountStatus(state=state, since=now)
    old = attr.evolve(old, fetched_total=old.fetched_total + result.fetched)
    if result.ok:
        return attr.evolve(old, state=OK, since=old.since if old.state == OK else now,
                           failing_since=None, failures=0, last_success_at=iso_utc(now))
    if result.kind == errors.REDIS:
        return attr.evolve(old, state=state, since=old.since if old.state == state else now)
    return attr.evolve(old, last_error_at=iso_utc(now), state=state,
                       since=old.since if old.state == state and old.failures else now,
                       failing_since=old.failing_since if old.failing_since is not None else now,
                       failures=old.failures + 1, last_message=result.message)


class NextStatusByConstructorTests(SynchronousTestCase):
    @hsettings(max_examples=200, deadline=None)
    @given(results, st.sampled_from([OK, errors.AUTH, errors.REDIS]),
           st.frozensets(st.integers(min_value=1, max_value=9), max_size=3))
    def test_next_status_builds_what_attr_evolve_built(self, sequence, reported, too_large):
        """One constructor call per session gives every field the old
        evolve chain gave, whatever the results and the fields it keeps."""
        ours = theirs = None
        now = 1_700_000_000.0
        for kind, fetched, gap in sequence:
            now += gap
            r = result(kind, fetched)
            ours, theirs = next_status(ours, r, now), _next_status_by_evolve(theirs, r, now)
            self.assertEqual(ours, theirs)
            # fields the rule carries over untouched
            ours = theirs = attr.evolve(ours, reported=reported, too_large=too_large)
