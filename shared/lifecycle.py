"""The job lifecycle: states, allowed transitions and outcomes.

This module is the only place that knows the state machine of docs/design.md::

    created → queued → initialized → started ⇄ paused → completed → stopped
    any non-terminal → stopped (user stop)   any non-terminal → failed

plus the retry edge: a job whose worker vanished (or that a stopping worker put back)
returns to ``queued`` from a running state, so the next attempt can pass through
``initialized`` again. Everything else (the database's compare-and-set, the backend's
event applier, the worker's own bookkeeping, the REST handlers) asks this module.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from labq.shared.errors import ConflictError


class State(StrEnum):
    CREATED = "created"  #: accepted and stored, not yet confirmed on the queue
    QUEUED = "queued"  #: on RabbitMQ, waiting for a worker
    INITIALIZED = "initialized"  #: a worker took it; bundle unpacked, environment ready
    STARTED = "started"  #: the script is running
    PAUSED = "paused"  #: the script's whole process tree is frozen
    COMPLETED = "completed"  #: the script exited; results and logs being stored
    STOPPED = "stopped"  #: terminal; resources freed, logs and results stored
    FAILED = "failed"  #: terminal; a fatal platform error


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"  #: the script exited 0
    ERROR = "error"  #: non-zero exit, killed by a signal, or out of memory
    TIMEOUT = "timeout"  #: the wall-clock limit was reached
    CANCELLED = "cancelled"  #: a user stopped it
    FAILED = "failed"  #: labq could not run it (bad bundle, environment, worker lost)


class Action(StrEnum):
    """What the job thread of a worker is asked to do with a running job."""

    PAUSE = "pause"  #: freeze the script's process tree
    RESUME = "resume"  #: let it go on
    STOP = "stop"  #: end it (outcome cancelled)
    SHUTDOWN = "shutdown"  #: the worker is stopping: put the job back on the queue


#: The actions a control message may carry (SHUTDOWN never travels on the broker).
CONTROL_ACTIONS: frozenset[Action] = frozenset({Action.PAUSE, Action.RESUME, Action.STOP})
#: The control action that moves a running job to a requested state.
ACTION_FOR_STATE: dict[State, Action] = {
    State.PAUSED: Action.PAUSE, State.STARTED: Action.RESUME, State.STOPPED: Action.STOP,
}


class RunResult(StrEnum):
    """How one attempt at a job ended, as far as the worker's delivery is concerned."""

    STOPPED = "stopped"  #: it has its outcome (recorded): ack
    FAILED = "failed"  #: labq could not run it (recorded): ack
    QUEUED = "queued"  #: put back unfinished (a stopping worker): nack, to run again


TERMINAL: frozenset[State] = frozenset({State.STOPPED, State.FAILED})
#: States in which a worker holds the job.
RUNNING: frozenset[State] = frozenset(
    {State.INITIALIZED, State.STARTED, State.PAUSED, State.COMPLETED}
)

TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATED: frozenset({State.QUEUED, State.STOPPED, State.FAILED}),
    State.QUEUED: frozenset({State.INITIALIZED, State.STOPPED, State.FAILED}),
    State.INITIALIZED: frozenset({State.STARTED, State.QUEUED, State.STOPPED, State.FAILED}),
    State.STARTED: frozenset(
        {State.PAUSED, State.COMPLETED, State.QUEUED, State.STOPPED, State.FAILED}
    ),
    State.PAUSED: frozenset({State.STARTED, State.QUEUED, State.STOPPED, State.FAILED}),
    State.COMPLETED: frozenset({State.STOPPED, State.QUEUED, State.FAILED}),
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
}

#: The states a user may ask for with ``PUT /jobs/{id}/state``.
USER_TARGETS: frozenset[State] = frozenset({State.PAUSED, State.STARTED, State.STOPPED})


def is_terminal(state: State | str) -> bool:
    return State(state) in TERMINAL


def can_transition(current: State | str, target: State | str) -> bool:
    """True when ``target`` is one direct step from ``current``."""
    return State(target) in TRANSITIONS[State(current)]


def can_reach(current: State | str, target: State | str) -> bool:
    """True when ``target`` lies on some path from ``current`` (at least one step).

    Events from a worker may arrive out of order or be skipped (two backend processes,
    a reconnect); the worker already walked the path step by step, so the backend
    accepts any newer event whose state is reachable from the one it has.
    """
    start, goal = State(current), State(target)
    seen: set[State] = set()
    todo = deque(TRANSITIONS[start])
    while todo:
        state = todo.popleft()
        if state == goal:
            return True
        if state not in seen:
            seen.add(state)
            todo.extend(TRANSITIONS[state])
    return False


def check_transition(current: State | str, target: State | str) -> None:
    """Raise :class:`ConflictError` unless ``current → target`` is one allowed step."""
    if not can_transition(current, target):
        raise ConflictError(
            f"a job cannot go from {State(current)} to {State(target)}",
            state=str(State(current)),
            allowed=sorted(str(s) for s in TRANSITIONS[State(current)]),
        )


def user_allowed_targets(current: State | str) -> list[str]:
    """What a user may ask for now (no-op repeats included), for 409 messages and buttons."""
    state = State(current)
    allowed = {t for t in USER_TARGETS if t in TRANSITIONS[state]}
    if state in (State.STARTED, State.PAUSED):
        allowed.add(state)
    if state == State.COMPLETED:
        allowed.add(State.STOPPED)
    return sorted(str(s) for s in allowed)


class Decision(StrEnum):
    NOOP = "noop"  #: the job is already in, or already heading to, the requested state
    APPLY = "apply"  #: the request must be carried out


@dataclass(frozen=True)
class UserRequest:
    decision: Decision
    target: State


def _repeat_decision(state: State, wanted: State,
                     pending: State | None) -> Decision | None:
    """The answer to a request the job already meets or is already heading to (None: a
    real change, to be checked against the transitions)."""
    # Already on the way there, or there with nothing else pending: harmless repeats.
    if wanted == pending or (wanted == state and pending in (None, state)):
        return Decision.NOOP
    if wanted == state:
        # Paused then resumed (or the reverse) before the worker answered: the opposite
        # request is on its way, so this one must be sent too, or it would be lost.
        return Decision.APPLY
    if wanted == State.STARTED and state in (State.CREATED, State.QUEUED, State.INITIALIZED):
        return Decision.NOOP  # it starts by itself
    if wanted == State.STOPPED and state == State.COMPLETED:
        return Decision.NOOP  # results are being stored; stops next
    return None


def plan_user_request(
    current: State | str, target: State | str, pending: State | str | None = None
) -> UserRequest:
    """Decide what ``PUT /jobs/{id}/state {"state": target}`` means for a job.

    ``pending`` is a state already requested and not yet reached (a stop or pause sent
    to the worker). Raises :class:`ConflictError` naming the current state and the
    allowed targets when the request is impossible.
    """
    state = State(current)
    try:
        wanted = State(target)
    except ValueError:
        wanted = None
    if wanted not in USER_TARGETS:
        raise ConflictError(
            f"{target!r} is not a state you can ask for; use one of paused, started, stopped",
            state=str(state),
            allowed=user_allowed_targets(state),
        )
    pending_state = State(pending) if pending else None
    if pending_state == State.STOPPED and wanted != State.STOPPED:
        raise ConflictError(
            f"the job is being stopped; it cannot be {wanted} any more",
            state=str(state),
            allowed=[str(State.STOPPED)],
        )
    decision = _repeat_decision(state, wanted, pending_state)
    if decision is not None:
        return UserRequest(decision, wanted)
    if wanted in TRANSITIONS[state]:
        return UserRequest(Decision.APPLY, wanted)
    allowed = user_allowed_targets(state)
    raise ConflictError(
        f"the job is {state}; it cannot be {wanted}"
        + (f" (allowed: {', '.join(allowed)})" if allowed else " (it has ended)"),
        state=str(state),
        allowed=allowed,
    )
