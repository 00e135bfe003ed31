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
from typing import Any

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
from labq.process_unit.joblog import JobLog
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
    OUTPUT = "output"  #: it printed more than its output cap


def prepare_output(project: Path) -> None:
    """Create ``output/`` before every run: a zip keeps no empty folder, and a script
    that writes ``output/x`` must not fail for that."""
    output = project / OUTPUT_DIR
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise LabqError("the project has a file named output, but output/ must be the "
                        "folder the job writes its results to; rename that file")
    output.mkdir(exist_ok=True)


def _requirements(run: _Run, project: Path, workspace: Path,
                  joblog: JobLog) -> Path | None:
    """requirements.txt, or for a rerun the lock of the job it re-runs."""
    if run.job.lock_of:
        recorded = read_environment(run.storage, run.job.lock_of)
        if recorded is None:  # it never got an environment (e.g. its install failed)
            joblog.note(f"job {run.job.lock_of} left no environment lock; "
                            "installing requirements.txt")
            requirements = project / REQUIREMENTS
            return requirements if requirements.is_file() else None
        packages = recorded.get("packages") or []
        joblog.note(f"using the exact packages of job {run.job.lock_of}")
        if not packages:
            return None
        lock = workspace / RERUN_LOCK
        lock.write_text("\n".join(packages) + "\n", encoding="utf-8")
        return lock
    requirements = project / REQUIREMENTS
    return requirements if requirements.is_file() else None


def header(attempt: int, worker: str) -> str:
    return f"=== labq: attempt {attempt} on {worker} ===\n"


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
        self.sup: Supervisor | None = None

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
    with JobLog.open(log_path) as joblog:
        joblog.line(header(attempt, worker))
        try:
            return _run(run, job, settings, storage, envs, workspace, joblog)
        except LabqError as exc:
            # A platform error: the researcher's script never got to run (or labq broke).
            # uv's own output is already in the log just above: name the failure once.
            first, _, rest = exc.message.partition("\n")
            joblog.note(f"failed: {first}" + (" (details above)" if rest else ""))
            log.warning("job %s failed: %s", job.job_id, exc.message)
            return run.finish(State.FAILED, Outcome.FAILED, error=exc.message)
        finally:
            control.set_status(None)
            if run.box is not None:
                run.box.close()  # nothing of the job survives, its uid goes back
            if run.sup is not None:
                run.sup.close_output()  # nothing holds its pipe now: the copier ends
            shutil.rmtree(workspace, ignore_errors=True)


def _run(run: _Run, job: JobMessage, settings: Settings, storage: Storage, envs: EnvCache,
         workspace: Path, joblog: JobLog) -> RunResult:
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
        joblog.note("stopped by the user before it ran")
        return run.finish(State.STOPPED, Outcome.CANCELLED)
    if control.shutdown_requested:
        run.set_state(State.QUEUED)
        return RunResult.QUEUED
    requirements = _requirements(run, project, workspace, joblog)
    try:
        return _run_in_env(run, job, envs, requirements, project, workspace, joblog)
    except BuildStoppedError:
        joblog.note("stopped by the user while its environment was being built")
        return run.finish(State.STOPPED, Outcome.CANCELLED)


def _run_in_env(run: _Run, job: JobMessage, envs: EnvCache, requirements: Path | None,
                project: Path, workspace: Path, joblog: JobLog) -> RunResult:
    storage, control = run.storage, run.control
    with envs.acquire(requirements, joblog,
                      cancelled=lambda: control.stop_requested) as env_dir:
        run.environment = record_environment(storage, job.job_id, env_dir)
        run.set_state(State.INITIALIZED, env_s=round(time.monotonic() - run.taken_at, 3))
        if control.stop_requested:
            joblog.note("stopped by the user before it ran")
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
        run.sup = sup = Supervisor(command, joblog, finder=box.processes,
                                   output_limit=box.output_limit)
        run.usage = Usage()
        sup.start(on_exit=run.control.interrupt, on_output_limit=run.control.interrupt)
        if job.spec.memory_mb and _kernel_limits_memory(box):
            run.sample_every = CGROUP_SAMPLE_S
        run.next_sample = sup.started_at + min(POLL_S, run.sample_every)
        box.started()
        run.set_state(State.STARTED)
        try:
            verdict = _supervise(run, sup, joblog)
        finally:
            _end_tree(sup, box)
            run.publish_status(None)
    sup.wait()  # its output is in the log now
    cpu_s, peak = _final_usage(sup, box)
    run.usage.finish(cpu_s, peak)
    if verdict == Verdict.EXITED and box.out_of_memory():
        verdict = Verdict.MEMORY
        if peak:  # it reached its limit, perhaps between two samples: that is its peak
            run.memory_mb = round(peak / MIB)
    if verdict == Verdict.EXITED and sup.output_over_limit:
        verdict = Verdict.OUTPUT  # it printed too much, and ended before it was stopped
    return _conclude(run, sup, verdict, project, joblog)


def _final_usage(sup: Supervisor, box: JobBox) -> tuple[float | None, int | None]:
    """The run's CPU seconds and memory high-water mark, measured once all of it is gone:
    the cgroup's counts; without them what wait4 said of the processes the worker reaped
    (the main process with its reaped descendants, and the orphans, bwrap's init among
    them): their CPU time, and the largest of them (a floor for the tree's peak)."""
    cpu_s, peak = box.cpu_seconds(), box.peak_bytes()
    if cpu_s is None or peak is None:
        sup.reap_orphans()
    return (sup.reaped_cpu_s if cpu_s is None else cpu_s,
            sup.reaped_rss_bytes if peak is None else peak)


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
        sup.reap_orphans()


def _supervise(run: _Run, sup: Supervisor, joblog: JobLog) -> Verdict:
    """Drive the run until it ends; return why: exited, stop, shutdown, timeout, memory.

    It sleeps in the mailbox between samples: a request wakes it, and so does the end of
    the job's process (the supervisor's exit thread interrupts the wait), so neither
    waits for the next sample."""
    while True:
        if sup.poll() is not None:
            return Verdict.EXITED
        verdict = _check_limits(run, sup, joblog)
        if verdict is not None:
            return verdict
        run.publish_status(sup)
        action = run.control.take(timeout=_wait_s(run, sup))
        if action is not None:
            verdict = _on_request(run, sup, action, joblog)
            if verdict is not None:
                return verdict


def _wait_s(run: _Run, sup: Supervisor) -> float:
    """Until the next memory sample, or the time limit if that comes first."""
    wait = run.next_sample - time.monotonic()
    if run.job.spec.timeout_s:
        wait = min(wait, run.job.spec.timeout_s - run.elapsed(sup))
    return max(0.0, min(wait, POLL_S))


def _check_limits(run: _Run, sup: Supervisor, joblog: JobLog) -> Verdict | None:
    """The output cap, the time limit, and (every ``run.sample_every``) a memory sample
    against the memory limit."""
    spec = run.job.spec
    if sup.output_over_limit:
        joblog.note(f"{_too_much_output(sup)}; stopping the job")
        sup.kill(run.settings.stop_grace_s)
        return Verdict.OUTPUT
    # Running time only: a paused job is not charged (as Slurm does for suspended jobs).
    if spec.timeout_s and run.elapsed(sup) >= spec.timeout_s:
        joblog.note(f"time limit of {spec.timeout_s} s reached; stopping the job")
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


def _on_request(run: _Run, sup: Supervisor, action: Action, joblog: JobLog
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
        joblog.note("stopped by the user")
        sup.kill(run.settings.stop_grace_s)
        return Verdict.STOP
    elif action == Action.SHUTDOWN:
        joblog.note("the worker is shutting down; the job goes back on the queue")
        sup.kill(run.settings.stop_grace_s)
        return Verdict.SHUTDOWN
    return None


def _conclude(run: _Run, sup: Supervisor, verdict: Verdict, project: Path,
              joblog: JobLog) -> RunResult:
    returncode = sup.wait()
    exit_info = classify(returncode, shell_convention=bool(run.box and run.box.jail.bwrap))
    if verdict == Verdict.SHUTDOWN:
        run.set_state(State.QUEUED)
        return RunResult.QUEUED
    if verdict != Verdict.STOP and run.state == State.STARTED:
        run.set_state(State.COMPLETED, exit_code=exit_info.exit_code)
    outcome, error = _verdict_outcome(run.job, verdict, exit_info, run.memory_mb)
    if verdict == Verdict.OUTPUT:
        error = _too_much_output(sup)
    if error:
        joblog.note(error)
    try:
        size = store_results(run.storage, run.job.job_id, project / OUTPUT_DIR,
                             run.job.spec.max_output_bytes, scratch=project.parent)
        joblog.note(f"stored {size} bytes of output/")
    except BundleTooLargeError as exc:
        joblog.note(f"results not stored: {exc.message}")
        if outcome == Outcome.SUCCEEDED:
            outcome = Outcome.ERROR
        error = error or exc.message
    joblog.note(f"outcome {outcome} (exit code {exit_info.exit_code})")
    return run.finish(State.STOPPED, outcome, exit_code=exit_info.exit_code, error=error)


def _too_much_output(sup: Supervisor) -> str:
    return (f"the job printed more than {sup.output_limit // MIB} MB to its log (its "
            "output cap: max_output_mb, 64 MB at least)")


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
    if verdict == Verdict.OUTPUT:
        return Outcome.ERROR, "the job printed more than its output cap"
    if exit_info.signal_text:
        return Outcome.ERROR, f"the job was {exit_info.signal_text}"
    if not exit_info.ok:
        return Outcome.ERROR, f"the job exited with code {exit_info.exit_code}"
    return Outcome.SUCCEEDED, None
