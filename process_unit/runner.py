"""Run one job end to end, in the job thread.

``run_job`` unpacks the bundle into a fresh workspace, takes (or builds) the
environment, runs the entrypoint under a :class:`Supervisor`, honours pause, resume
and stop requests and the job's limits, stores ``output/`` as the results, writes
``outcome.json`` and reports every lifecycle step through ``emit(state, **fields)``.
It never touches RabbitMQ: the worker turns ``emit`` calls into events.

What ``run_job`` returns (a :class:`RunResult`) tells the worker what to do with the
delivery: ``STOPPED``/``FAILED`` (outcome recorded: ack) or ``QUEUED`` (the worker is
shutting down and put the job back: nack with requeue, no outcome).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from labq.process_unit import proctree, sandbox
from labq.process_unit.cgroups import run_name
from labq.process_unit.control import Control, Status
from labq.process_unit.envcache import BuildStoppedError, EnvCache
from labq.process_unit.envlock import (
    RERUN_LOCK,
    read_environment,
    record_environment,
    write_environment,
)
from labq.process_unit.jobbox import HostSandbox, JobBox
from labq.process_unit.results import store_results
from labq.process_unit.supervisor import Exit, Supervisor, classify, new_token
from labq.process_unit.usage import Usage, cpu_seconds, write_usage
from labq.shared.bundle import OUTPUT_DIR, REQUIREMENTS, BundleLimits, extract_bundle
from labq.shared.errors import BundleTooLargeError, LabqError
from labq.shared.lifecycle import Action, Outcome, RunResult, State
from labq.shared.messages import JobMessage
from labq.shared.outcome import OutcomeRecord
from labq.shared.settings import MIB, Settings
from labq.shared.storage import Storage

log = logging.getLogger(__name__)

Emit = Callable[..., Any]
#: How often the job thread checks the process, its limits and the mailbox.
POLL_S = 0.25
#: How often memory and CPU are sampled when a memory cgroup enforces the limit (the
#: kernel does, at once): the chart needs no more, and each sample walks /proc. Without
#: one, every POLL_S: the samples are what enforces the memory limit then.
CGROUP_SAMPLE_S = 1.0


class Verdict(StrEnum):
    """Why supervising a running script ended."""

    EXITED = "exited"  #: the script ended by itself
    STOP = "stop"  #: the user stopped it
    SHUTDOWN = "shutdown"  #: the worker is stopping: the job goes back on the queue
    TIMEOUT = "timeout"  #: its running time reached timeout_s
    MEMORY = "memory"  #: it used more than memory_mb


def prepare_output(project: Path) -> None:
    """Create ``output/`` before every run: a zip keeps no empty folder, and a script
    that writes ``output/x`` must not fail for that."""
    output = project / OUTPUT_DIR
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise LabqError("the project has a file named output, but output/ must be the "
                        "folder the job writes its results to; rename that file")
    output.mkdir(exist_ok=True)


def _requirements(run: _Run, project: Path, workspace: Path,
                  log_file: BinaryIO) -> Path | None:
    """requirements.txt, or for a rerun the lock of the job it re-runs."""
    if run.job.lock_of:
        recorded = read_environment(run.storage, run.job.lock_of)
        if recorded is None:  # it never got an environment (e.g. its install failed)
            _note(log_file, f"job {run.job.lock_of} left no environment lock; "
                            "installing requirements.txt")
            requirements = project / REQUIREMENTS
            return requirements if requirements.is_file() else None
        packages = recorded.get("packages") or []
        _note(log_file, f"using the exact packages of job {run.job.lock_of}")
        if not packages:
            return None
        lock = workspace / RERUN_LOCK
        lock.write_text("\n".join(packages) + "\n", encoding="utf-8")
        return lock
    requirements = project / REQUIREMENTS
    return requirements if requirements.is_file() else None


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
        #: When the next memory sample is due (the first one a tick after the start:
        #: right at the start there is only the launcher to measure).
        self.next_sample = 0.0
        self.sample_every = POLL_S
        self.taken_at = time.monotonic()
        self.usage: Usage | None = None
        self.environment: dict[str, Any] | None = None
        self.sandbox: HostSandbox | None = None
        self.box: JobBox | None = None

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
        cpu = self.usage.cpu_s if self.usage else None
        self.control.set_status(Status(str(self.state), round(self.elapsed(sup), 3),
                                       self.memory_mb, cpu))

    def measures(self) -> dict[str, float]:
        if self.usage is None:
            return {}
        return {"peak_rss_mb": self.usage.peak_rss_mb, "cpu_s": self.usage.cpu_s}

    def finish(self, state: State, outcome: Outcome, exit_code: int | None = None,
               error: str | None = None) -> RunResult:
        measures = self.measures()
        record = OutcomeRecord(state=state, outcome=outcome, exit_code=exit_code, error=error,
                               attempt=self.attempt, worker=self.worker, **measures)
        # Written (again) once the job's processes are gone: the job can write to its
        # folder while it runs, so what it may have put there is replaced.
        if self.usage is not None:
            write_usage(self.storage, self.job.job_id, self.usage)
        if self.environment is not None:
            write_environment(self.storage, self.job.job_id, self.environment)
        self.storage.write_outcome(self.job.job_id, record)
        self.set_state(state, outcome=str(outcome), exit_code=exit_code, error=error,
                       **measures)
        return RunResult(str(state))


def run_job(job: JobMessage, settings: Settings, emit: Emit, control: Control, *,
            attempt: int, worker: str, storage: Storage | None = None,
            envs: EnvCache | None = None, sandbox: HostSandbox | None = None) -> RunResult:
    """Run ``job`` (attempt number ``attempt``) to its end; see the module docstring.

    ``sandbox``: the worker's :class:`HostSandbox` (None: no sandbox, as in unit tests).
    """
    storage = storage or Storage.from_settings(settings).ensure()
    sandbox = sandbox or HostSandbox.off(settings)
    settings = sandbox.settings
    envs = envs or EnvCache(settings, storage, sandbox.build_box())
    run = _Run(job, settings, storage, emit, control, attempt, worker)
    run.sandbox = sandbox
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
            # uv's own output is already in the log just above: name the failure once.
            first, _, rest = exc.message.partition("\n")
            _note(log_file, f"failed: {first}" + (" (details above)" if rest else ""))
            log.warning("job %s failed: %s", job.job_id, exc.message)
            return run.finish(State.FAILED, Outcome.FAILED, error=exc.message)
        finally:
            control.set_status(None)
            if run.box is not None:
                run.box.close()  # nothing of the job survives, its uid goes back
            shutil.rmtree(workspace, ignore_errors=True)


def _run(run: _Run, job: JobMessage, settings: Settings, storage: Storage, envs: EnvCache,
         workspace: Path, log_file: BinaryIO) -> RunResult:
    control = run.control
    # Orphans of an earlier attempt whose worker died must be gone before this one runs
    # (a first attempt has none: no process of a job starts before its attempt is noted).
    if run.attempt > 1:
        proctree.kill_job_leftovers(job.job_id, sandbox.TOKEN_VAR)
    if workspace.exists():
        shutil.rmtree(workspace)
    project = workspace / "project"
    # What is run must be what was uploaded: a bundle changed in storage is refused.
    with storage.fetched_bundle(job.bundle_sha256, workspace) as bundle:
        extract_bundle(bundle, project, BundleLimits.from_settings(settings))
    prepare_output(project)
    if control.stop_requested:
        _note(log_file, "stopped by the user before it ran")
        return run.finish(State.STOPPED, Outcome.CANCELLED)
    if control.shutdown_requested:
        run.set_state(State.QUEUED)
        return RunResult.QUEUED
    requirements = _requirements(run, project, workspace, log_file)
    try:
        return _run_in_env(run, job, envs, requirements, project, workspace, log_file)
    except BuildStoppedError:
        _note(log_file, "stopped by the user while its environment was being built")
        return run.finish(State.STOPPED, Outcome.CANCELLED)


def _run_in_env(run: _Run, job: JobMessage, envs: EnvCache, requirements: Path | None,
                project: Path, workspace: Path, log_file: BinaryIO) -> RunResult:
    storage, control = run.storage, run.control
    with envs.acquire(requirements, log_file,
                      cancelled=lambda: control.stop_requested) as env_dir:
        run.environment = record_environment(storage, job.job_id, env_dir)
        run.set_state(State.INITIALIZED, env_s=round(time.monotonic() - run.taken_at, 3))
        if control.stop_requested:
            _note(log_file, "stopped by the user before it ran")
            return run.finish(State.STOPPED, Outcome.CANCELLED)
        for folder in ("home", "tmp"):
            (workspace / folder).mkdir(exist_ok=True)
        assert run.sandbox is not None
        run.box = box = run.sandbox.open(
            workspace=workspace, memory_mb=job.spec.memory_mb, cpus=job.spec.cpus,
            max_output_bytes=job.spec.max_output_bytes, network=job.spec.network,
            name=run_name(f"{job.job_id[:12]}-{run.attempt}"))
        command = sandbox.build_command(
            env_dir=env_dir, project=project, workspace=workspace,
            entrypoint=job.spec.entrypoint, args=job.spec.args, user_env=job.spec.env,
            job_id=job.job_id,
            attempt=run.attempt, token=new_token(), cpus=job.spec.cpus, jail=box.jail,
        )
        sup = Supervisor(command, log_file.fileno(), finder=box.processes)
        run.usage = Usage()
        sup.start(on_exit=run.control.interrupt)
        if job.spec.memory_mb and _kernel_limits_memory(box):
            run.sample_every = CGROUP_SAMPLE_S
        run.next_sample = sup.started_at + min(POLL_S, run.sample_every)
        box.started()
        run.set_state(State.STARTED)
        try:
            verdict = _supervise(run, sup, log_file)
        finally:
            _end_tree(sup, box)
            run.publish_status(None)
    sup.wait()
    if verdict == Verdict.EXITED and box.out_of_memory():
        verdict = Verdict.MEMORY
        peak = box.cgroup.peak_bytes() if box.cgroup else None
        if peak:
            run.memory_mb = round(peak / MIB)
            # It reached its limit, perhaps between two samples: that is its peak.
            run.usage.peak_rss_mb = max(run.usage.peak_rss_mb, float(run.memory_mb))
    run.usage.finish()
    return _conclude(run, sup, verdict, project, log_file)


def _kernel_limits_memory(box: JobBox) -> bool:
    """The run's cgroup holds its memory limit (v2 always sets it or fails; v1 only
    where the memory controller is mounted)."""
    group = box.cgroup
    return group is not None and bool(group.memory_limit_bytes) \
        and (group.layout == "v2" or "memory" in group.dirs)


def _end_tree(sup: Supervisor, box: JobBox) -> None:
    """Never leave anything of the job behind, and do it before its output/ is read:
    nothing of the job can change what labq stores as results. The box sees every
    process of the run (its cgroup and its uid, which no setsid or double fork leaves);
    without one, the supervisor's tree walk finds them."""
    sup.kill_main()  # in case it ended early, before the launcher joined the box
    if box.cgroup is not None or box.lease is not None:
        box.kill()
    elif sup.processes():
        sup.kill_now()
    if box.jail.bwrap is None:
        # Orphans re-parented to us (the subreaper) are zombies until reaped; inside
        # bwrap they belong to the job's own pid namespace instead.
        proctree.reap_zombies(skip={sup.pid} if sup.popen and sup.popen.returncode is None
                              else set())


def _supervise(run: _Run, sup: Supervisor, log_file: BinaryIO) -> Verdict:
    """Drive the run until it ends; return why: exited, stop, shutdown, timeout, memory.

    It sleeps in the mailbox between samples: a request wakes it, and so does the end of
    the job's process (the supervisor's exit thread interrupts the wait), so neither
    waits for the next sample."""
    while True:
        if sup.poll() is not None:
            return Verdict.EXITED
        verdict = _check_limits(run, sup, log_file)
        if verdict is not None:
            return verdict
        run.publish_status(sup)
        action = run.control.take(timeout=_wait_s(run, sup))
        if action is not None:
            verdict = _on_request(run, sup, action, log_file)
            if verdict is not None:
                return verdict


def _wait_s(run: _Run, sup: Supervisor) -> float:
    """Until the next memory sample, or the time limit if that comes first."""
    wait = run.next_sample - time.monotonic()
    if run.job.spec.timeout_s:
        wait = min(wait, run.job.spec.timeout_s - run.elapsed(sup))
    return max(0.0, min(wait, POLL_S))


def _check_limits(run: _Run, sup: Supervisor, log_file: BinaryIO) -> Verdict | None:
    """The time limit, and (every ``run.sample_every``) a memory sample against the
    memory limit."""
    spec = run.job.spec
    # Running time only: a paused job is not charged (as Slurm does for suspended jobs).
    if spec.timeout_s and run.elapsed(sup) >= spec.timeout_s:
        _note(log_file, f"time limit of {spec.timeout_s} s reached; stopping the job")
        sup.kill(run.settings.stop_grace_s)
        return Verdict.TIMEOUT
    now = time.monotonic()
    if now < run.next_sample:
        return None
    run.next_sample = now + run.sample_every
    procs = sup.processes()
    used = proctree.rss_bytes(procs)
    run.memory_mb = round(used / MIB, 1)
    if run.usage is not None:
        run.usage.sample(run.elapsed(sup), used, cpu_seconds(procs))
    if spec.memory_mb and used > spec.memory_mb * MIB:
        run.memory_mb = round(used / MIB)
        sup.kill_now()
        return Verdict.MEMORY
    return None


def _on_request(run: _Run, sup: Supervisor, action: Action, log_file: BinaryIO
                ) -> Verdict | None:
    """Apply a pause, resume, stop or shutdown request; a verdict when the run ends."""
    if action in (Action.STOP, Action.SHUTDOWN) and sup.poll() is not None:
        # It ended on its own while we waited for the request: that end stands, and
        # a job that finished must not be put back and run again.
        return Verdict.EXITED
    if action == Action.PAUSE and run.state == State.STARTED:
        sup.pause()
        run.paused_since = time.monotonic()
        run.set_state(State.PAUSED)
    elif action == Action.RESUME and run.state == State.PAUSED:
        sup.resume()
        if run.paused_since is not None:
            run.paused_total += time.monotonic() - run.paused_since
        run.paused_since = None
        run.set_state(State.STARTED)
    elif action == Action.STOP:
        _note(log_file, "stopped by the user")
        sup.kill(run.settings.stop_grace_s)
        return Verdict.STOP
    elif action == Action.SHUTDOWN:
        _note(log_file, "the worker is shutting down; the job goes back on the queue")
        sup.kill(run.settings.stop_grace_s)
        return Verdict.SHUTDOWN
    return None


def _conclude(run: _Run, sup: Supervisor, verdict: Verdict, project: Path,
              log_file: BinaryIO) -> RunResult:
    returncode = sup.wait()
    exit_info = classify(returncode, shell_convention=bool(run.box and run.box.jail.bwrap))
    if verdict == Verdict.SHUTDOWN:
        run.set_state(State.QUEUED)
        return RunResult.QUEUED
    if verdict != Verdict.STOP and run.state == State.STARTED:
        run.set_state(State.COMPLETED, exit_code=exit_info.exit_code)
    outcome, error = _verdict_outcome(run.job, verdict, exit_info, run.memory_mb)
    if error:
        _note(log_file, error)
    try:
        size = store_results(run.storage, run.job.job_id, project / OUTPUT_DIR,
                             run.job.spec.max_output_bytes, scratch=project.parent)
        _note(log_file, f"stored {size} bytes of output/")
    except BundleTooLargeError as exc:
        _note(log_file, f"results not stored: {exc.message}")
        if outcome == Outcome.SUCCEEDED:
            outcome = Outcome.ERROR
        error = error or exc.message
    _note(log_file, f"outcome {outcome} (exit code {exit_info.exit_code})")
    return run.finish(State.STOPPED, outcome, exit_code=exit_info.exit_code, error=error)


def _verdict_outcome(job: JobMessage, verdict: Verdict, exit_info: Exit,
                     memory_mb: float | None) -> tuple[Outcome, str | None]:
    """The outcome of a run that ended (not put back), and the error to show with it."""
    if verdict == Verdict.TIMEOUT:
        return Outcome.TIMEOUT, f"the job ran longer than its time limit of " \
                                f"{job.spec.timeout_s} s"
    if verdict == Verdict.MEMORY:
        return Outcome.ERROR, (f"out of memory (limit {job.spec.memory_mb} MB): the job "
                               f"used {memory_mb or 0:.0f} MB at its peak")
    if verdict == Verdict.STOP:
        return Outcome.CANCELLED, None
    if exit_info.signal_text:
        return Outcome.ERROR, f"the job was {exit_info.signal_text}"
    if not exit_info.ok:
        return Outcome.ERROR, f"the job exited with code {exit_info.exit_code}"
    return Outcome.SUCCEEDED, None
