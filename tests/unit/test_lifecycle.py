"""The lifecycle table, tested as a whole: every (state, state) pair."""

from __future__ import annotations

import itertools

import pytest

from labq.shared import lifecycle
from labq.shared.errors import ConflictError
from labq.shared.lifecycle import Decision, State, plan_user_request

S = State
# The expected table, written out independently of the module under test.
ALLOWED = {
    (S.CREATED, S.QUEUED), (S.CREATED, S.STOPPED), (S.CREATED, S.FAILED),
    (S.QUEUED, S.INITIALIZED), (S.QUEUED, S.STOPPED), (S.QUEUED, S.FAILED),
    (S.INITIALIZED, S.STARTED), (S.INITIALIZED, S.QUEUED), (S.INITIALIZED, S.STOPPED),
    (S.INITIALIZED, S.FAILED),
    (S.STARTED, S.PAUSED), (S.STARTED, S.COMPLETED), (S.STARTED, S.QUEUED),
    (S.STARTED, S.STOPPED), (S.STARTED, S.FAILED),
    (S.PAUSED, S.STARTED), (S.PAUSED, S.QUEUED), (S.PAUSED, S.STOPPED), (S.PAUSED, S.FAILED),
    (S.COMPLETED, S.STOPPED), (S.COMPLETED, S.QUEUED), (S.COMPLETED, S.FAILED),
}


@pytest.mark.parametrize("current,target", list(itertools.product(State, State)))
def test_every_pair_of_states_is_allowed_exactly_when_the_design_says(current, target):
    assert lifecycle.can_transition(current, target) == ((current, target) in ALLOWED)
    if (current, target) in ALLOWED:
        lifecycle.check_transition(current, target)
    else:
        with pytest.raises(ConflictError) as err:
            lifecycle.check_transition(current, target)
        assert err.value.details["state"] == current


def test_terminal_states_have_no_way_out():
    for state in lifecycle.TERMINAL:
        assert not any(lifecycle.can_reach(state, t) for t in State)


def test_every_non_terminal_state_can_be_stopped_and_failed():
    for state in set(State) - lifecycle.TERMINAL:
        assert lifecycle.can_transition(state, S.STOPPED)
        assert lifecycle.can_transition(state, S.FAILED)


def test_reach_accepts_skipped_steps_but_not_going_back_to_created():
    assert lifecycle.can_reach(S.QUEUED, S.STOPPED)
    assert lifecycle.can_reach(S.QUEUED, S.COMPLETED)
    assert lifecycle.can_reach(S.STARTED, S.INITIALIZED)  # via queued: a retry
    assert not lifecycle.can_reach(S.QUEUED, S.CREATED)


@pytest.mark.parametrize("current,target", [
    (S.STARTED, S.PAUSED), (S.PAUSED, S.STARTED), (S.STARTED, S.STOPPED),
    (S.QUEUED, S.STOPPED), (S.CREATED, S.STOPPED), (S.PAUSED, S.STOPPED),
    (S.INITIALIZED, S.STOPPED),
])
def test_user_requests_that_must_be_carried_out(current, target):
    assert plan_user_request(current, target).decision == Decision.APPLY


@pytest.mark.parametrize("current,target,pending", [
    (S.STARTED, S.STARTED, S.PAUSED), (S.PAUSED, S.PAUSED, S.STARTED),
])
def test_undoing_a_request_the_worker_has_not_answered_yet_is_sent(current, target, pending):
    # Given a pause on its way to a running job, When the user resumes at once,
    # Then the resume is sent too (a no-op would leave the job paused for good).
    assert plan_user_request(current, target, pending).decision == Decision.APPLY


@pytest.mark.parametrize("current,target,pending", [
    (S.PAUSED, S.PAUSED, None), (S.STARTED, S.STARTED, None), (S.STOPPED, S.STOPPED, None),
    (S.QUEUED, S.STARTED, None), (S.COMPLETED, S.STOPPED, None),
    (S.STARTED, S.STOPPED, S.STOPPED), (S.STARTED, S.PAUSED, S.PAUSED),
])
def test_repeated_requests_are_no_ops(current, target, pending):
    assert plan_user_request(current, target, pending).decision == Decision.NOOP


@pytest.mark.parametrize("current,target,pending", [
    (S.QUEUED, S.PAUSED, None), (S.STOPPED, S.STARTED, None), (S.FAILED, S.STOPPED, None),
    (S.COMPLETED, S.PAUSED, None), (S.STARTED, S.PAUSED, S.STOPPED),
    (S.STARTED, S.QUEUED, None), (S.STARTED, "bogus", None),
])
def test_impossible_requests_name_the_state_and_what_is_allowed(current, target, pending):
    with pytest.raises(ConflictError) as err:
        plan_user_request(current, target, pending)
    assert err.value.status == 409
    assert err.value.details["state"] == current
    assert isinstance(err.value.details["allowed"], list)
