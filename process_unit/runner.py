"""Run one job end to end, in the job thread.

``run_job`` unpacks the bundle into a fresh workspace, takes (or builds) the
environment, runs the entrypoint under a :class:`Supervisor`, honours pause, resume
and stop requests and the job's limits, stores ``output/`` as the results, writes
``outcome.json`` and reports every lifecycle step through ``emit(state, **fields)``.
It never touches RabbitMQ: the worker turns ``emit`` calls into events.

What ``run_job`` returns tells the worker what to do with the delivery:
``"stopped"``/``"failed"`` (outcome recorded: ack) or ``"queued"`` (the worker is
shutting down and put the job back: nack with requeue, no outcome).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from process_unit import proctree, sandbox
from process_unit.control import Control, Status
from process_unit.envcache import EnvCache
from process_unit.results import store_results
from process_unit.supervisor import Supervisor, classify, new_token
from shared.bundle import BundleLimits, extract_bundle
from shared.errors import BundleTooLargeError, LabqError
from shared.lifecycle import Outcome, State
from shared.messages import JobMessage
from shared.settings import MIB, Settings
from shared.storage import Storage

log = logging.getLogger(__name__)

Emit = Callable[..., Any]
#: How often the job thread checks the process, its limits and the mailbox.
POLL_S = 0.25


def header(attempt: int, worker: str) -> str:
    return f"=== labq: attempt {attempt} on {worker} ===\n"


def _note(log_file: BinaryIO, text: str) -> None:
    log_file.write(f"labq: {text}\n".encode())
    log_file.flush()


class _Run:
    """State of one attempt while it runs (kept out of run_job to keep that readable)."""

    def __init__(self, job: JobMessage, settings: Settings, storage: Storage, emit: Emit,
                 control: Control, attempt: int, worker: str) -> None:
        self.job = job
        self.settings = settings
        self.storage = storage
        self.emit = emit
        self.control = control
        self.attempt = attempt
        self.worker = worker
        self.state = State.QUEUED
        self.paused_total = 0.0
        self.paused_since: float | None = None
        self.memory_mb: float | None = None

    def set_state(self, state: State, **fields: Any) -> None:
        self.state = state
        self.emit(str(state), **fields)

    def elapsed(self, sup: Supervisor) -> float:
        now = time.monotonic()
        paused = self.paused_total + (now - self.paused_since if self.paused_since else 0.0)
        return max(0.0, now - sup.started_at - paused)

    def publish_status(self, sup: Supervisor | None) -> None:
        if sup is None:
            self.control.set_status(None)
            return
        self.control.set_status(Status(str(self.state), round(self.elapsed(sup), 3),
                                       self.memory_mb))

    def finish(self, state: State, outcome: Outcome, exit_code: int | None = None,
               error: str | None = None) -> str:
        record = {
            "state": str(state), "outcome": str(outcome), "exit_code": exit_code,
            "error": error, "attempt": self.attempt, "worker": self.worker, "at": time.time(),
        }
        self.storage.write_outcome(self.job.job_id, record)
        self.set_state(state, outcome=str(outcome), exit_code=exit_code, error=error)
        return str(state)


def run_job(job: JobMessage, settings: Settings, emit: Emit, control: Control, *,
            attempt: int, worker: str, storage: Storage | None = None,
            envs: EnvCache | None = None) -> str:
    """Run ``job`` (attempt number ``attempt``) to its end; see the module docstring."""
    storage = storage or Storage(settings.data_dir).ensure()
    envs = envs or EnvCache(settings, storage)
    run = _Run(job, settings, storage, emit, control, attempt, worker)
    log_path = storage.log_path(job.job_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    workspace = settings.resolved_work_dir / f"{job.job_id}-{attempt}"
    with open(log_path, "ab") as log_file:
        log_file.write(header(attempt, worker).encode())
        log_file.flush()
        try:
            return _run(run, job, settings, storage, envs, workspace, log_file)
        except LabqError as exc:
            # A platform error: the researcher's script never got to run (or labq broke).
            _note(log_file, f"failed: {exc.message}")
            log.warning("job %s failed: %s", job.job_id, exc.message)
            return run.finish(State.FAILED, Outcome.FAILED, error=exc.message)
        finally:
            control.set_status(None)
            shutil.rmtree(workspace, ignore_errors=True)


def _run(run: _Run, job: JobMessage, settings: Settings, storage: Storage, envs: EnvCache,
         workspace: Path, log_file: BinaryIO) -> str:
    control = run.control
    # Orphans of an earlier attempt whose worker died must be gone before this one runs.
    proctree.kill_job_leftovers(job.job_id, sandbox.TOKEN_VAR)
    if workspace.exists():
        shutil.rmtree(workspace)
    project = workspace / "project"
    bundle = storage.bundle_path(job.bundle_sha256)
    if not bundle.exists():
        raise LabqError(f"the job's bundle {job.bundle_sha256[:12]} is missing from the data dir")
    extract_bundle(bundle, project, BundleLimits.from_settings(settings))
    if control.stop_requested:
        _note(log_file, "stopped by the user before it ran")
        return run.finish(State.STOPPED, Outcome.CANCELLED)
    if control.shutdown_requested:
        run.set_state(State.QUEUED)
        return "queued"
    requirements = project / "requirements.txt"
    with envs.acquire(requirements if requirements.is_file() else None, log_file) as env_dir:
        run.set_state(State.INITIALIZED)
        if control.stop_requested:
            _note(log_file, "stopped by the user before it ran")
            return run.finish(State.STOPPED, Outcome.CANCELLED)
        command = sandbox.build_command(
            env_dir=env_dir, project=project, workspace=workspace,
            entrypoint=job.entrypoint, args=job.args, user_env=job.env, job_id=job.job_id,
            attempt=run.attempt, token=new_token(), cpus=job.cpus,
        )
        sup = Supervisor(command, log_file.fileno())
        sup.start()
        run.set_state(State.STARTED)
        try:
            verdict = _supervise(run, sup, log_file)
        finally:
            if sup.processes():  # never leave anything of the job behind
                sup.kill_now()
            run.publish_status(None)
    return _conclude(run, sup, verdict, project, log_file)


def _supervise(run: _Run, sup: Supervisor, log_file: BinaryIO) -> str:
    """Drive the run until it ends; return why: exited, stop, shutdown, timeout, memory."""
    job, settings, control = run.job, run.settings, run.control
    limit_bytes = job.memory_mb * MIB if job.memory_mb else 0
    next_memory = 0.0
    while True:
        if sup.poll() is not None:
            return "exited"
        now = time.monotonic()
        if job.timeout_s and now - sup.started_at >= job.timeout_s:
            _note(log_file, f"time limit of {job.timeout_s} s reached; stopping the job")
            sup.kill(settings.stop_grace_s)
            return "timeout"
        if now >= next_memory:
            next_memory = now + POLL_S
            used = sup.memory_bytes()
            run.memory_mb = round(used / MIB, 1)
            if limit_bytes and used > limit_bytes:
                run.memory_mb = round(used / MIB)
                sup.kill_now()
                return "memory"
        run.publish_status(sup)
        action = control.take(timeout=POLL_S)
        if action == "pause" and run.state == State.STARTED:
            sup.pause()
            run.paused_since = time.monotonic()
            run.set_state(State.PAUSED)
        elif action == "resume" and run.state == State.PAUSED:
            sup.resume()
            if run.paused_since is not None:
                run.paused_total += time.monotonic() - run.paused_since
            run.paused_since = None
            run.set_state(State.STARTED)
        elif action == "stop":
            _note(log_file, "stopped by the user")
            sup.kill(settings.stop_grace_s)
            return "stop"
        elif action == "shutdown":
            _note(log_file, "the worker is shutting down; the job goes back on the queue")
            sup.kill(settings.stop_grace_s)
            return "shutdown"


def _conclude(run: _Run, sup: Supervisor, verdict: str, project: Path,
              log_file: BinaryIO) -> str:
    job = run.job
    returncode = sup.wait()
    exit_info = classify(returncode)
    if verdict == "shutdown":
        run.set_state(State.QUEUED)
        return "queued"
    if verdict in ("exited", "timeout", "memory") and run.state == State.STARTED:
        run.set_state(State.COMPLETED, exit_code=exit_info.exit_code)
    error: str | None = None
    if verdict == "exited":
        outcome = Outcome.SUCCEEDED if exit_info.ok else Outcome.ERROR
        if exit_info.signal_text:
            error = f"the job was {exit_info.signal_text}"
        elif not exit_info.ok:
            error = f"the job exited with code {exit_info.exit_code}"
    elif verdict == "timeout":
        outcome = Outcome.TIMEOUT
        error = f"the job ran longer than its time limit of {job.timeout_s} s"
    elif verdict == "memory":
        outcome = Outcome.ERROR
        error = (f"out of memory: the job used {run.memory_mb:.0f} MB, "
                 f"its limit is {job.memory_mb} MB")
    else:  # stop
        outcome = Outcome.CANCELLED
    if error:
        _note(log_file, error)
    try:
        size = store_results(run.storage, job.job_id, project / "output", job.max_output_bytes)
        _note(log_file, f"stored {size} bytes of output/")
    except BundleTooLargeError as exc:
        _note(log_file, f"results not stored: {exc.message}")
        if outcome == Outcome.SUCCEEDED:
            outcome = Outcome.ERROR
        error = error or exc.message
    _note(log_file, f"outcome {outcome} (exit code {exit_info.exit_code})")
    return run.finish(State.STOPPED, outcome, exit_code=exit_info.exit_code, error=error)
