"""The worker: one RabbitMQ connection, one job at a time (docs/internals.md, "Worker").

Threads:

* the **connection thread** (the main thread) owns the broker connection
  (:class:`~labq.consumer.link.BrokerLink`) for the worker's whole life and keeps
  serving it, so broker heartbeats are answered while a job runs or its environment
  builds; it decodes deliveries, takes the run lock, applies the delivery rules
  (:mod:`labq.consumer.delivery`), publishes events, settles and reconnects;
* one **job thread** per job runs :func:`process_unit.runner.run_job`. It never
  touches pika: its lifecycle events go into the link's outbox, which the connection
  thread flushes (woken by ``add_callback_threadsafe``), in order, with publisher
  confirms, after a reconnect if the broker was away.

A delivery is acked only after ``outcome.json`` was written and the final event
confirmed, and only when its tag belongs to the live channel: after a reconnect the
old tag is stale, and the broker's redelivery finds ``outcome.json`` and is acked as
a duplicate instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from labq.consumer import maintenance
from labq.consumer.delivery import (
    Delivery,
    Plan,
    PlanKind,
    Settle,
    crash_record,
    plan_delivery,
    settle_after,
)
from labq.consumer.link import BROKER_ERRORS, BrokerLink
from labq.consumer.maintenance import Schedule, Task
from labq.process_unit import proctree
from labq.process_unit.envcache import EnvCache
from labq.process_unit.jobbox import HostSandbox, write_report
from labq.process_unit.runner import run_job
from labq.process_unit.sandbox import TOKEN_VAR
from labq.shared.errors import ConfigError, DecodeError, LabqError
from labq.shared.hardening import protect_process
from labq.shared.lifecycle import Action, RunResult
from labq.shared.logs import setup_logging
from labq.shared.messages import ControlMessage, JobMessage, LifecycleEvent, event_seq
from labq.shared.settings import Settings
from labq.shared.storage import Storage
from labq.shared.topology import Topology, connect

log = logging.getLogger(__name__)

#: Exit codes of ``labq worker``.
EXIT_OK = 0
EXIT_SOFTWARE = 70  # an unexpected error inside the worker
EXIT_CONFIG = 78  # a setting cannot be used

#: Seconds between lock polls of a parked redelivery.
PARK_POLL_S = 1.0
#: Seconds between checks of the running job's stop marker.
SWEEP_S = 2.0
#: Seconds between sweeps for leftover job processes of dead workers (each reads the
#: environment of every process on the host; their own death signal and the sandbox's
#: cgroup and uid clean-up usually got them first).
ORPHAN_SWEEP_S = 5.0
#: Connection slice: how quickly the loop notices its own work.
TICK_S = 0.2
#: How often a worker touches its sandbox report (the backend drops reports gone stale).
REPORT_EVERY_S = 30.0

Runner = Callable[..., RunResult]


def worker_name(settings: Settings) -> str:
    return settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, settings: Settings, connect_fn: Callable[[], Any] | None = None,
                 runner: Runner = run_job) -> None:
        # The sandbox decides the work dir and the job interpreter: use its settings.
        self.sandbox = HostSandbox.start(settings)
        settings = self.sandbox.settings
        self.settings = settings
        self.storage = Storage.from_settings(settings).ensure()
        self.name = worker_name(settings)
        #: Named on every event, so the job's record says which machine ran it.
        self.host = socket.gethostname()
        self.envs = EnvCache(settings, self.storage, self.sandbox.build_box())
        self.runner = runner
        self._report_path = write_report(settings.data_dir, self.name, self.sandbox.report())
        self.link = BrokerLink(
            Topology.from_settings(settings),
            connect_fn or (lambda: connect(settings, f"labq-worker {self.name}")))
        self.current: Delivery | None = None
        self.parked: Delivery | None = None
        self.stopping = False
        self.shutdown_deadline = 0.0
        self.schedule = Schedule(
            Task("touch sandbox report", REPORT_EVERY_S,
                 lambda: maintenance.touch_report(self._report_path)),
            Task("publish job status", settings.status_interval_s,
                 lambda: maintenance.publish_status(self.link, self.current, self.name)),
            Task("check stop marker", SWEEP_S,
                 lambda: maintenance.check_stop_marker(self.storage, self.current)),
            Task("sweep orphans", ORPHAN_SWEEP_S,
                 lambda: maintenance.sweep_orphans(busy=self.current is not None)),
            # A busy worker unbinds them when its next job starts (Worker._start).
            Task("unbind finished jobs' control keys", SWEEP_S,
                 lambda: None if self.current else self.link.unbind_released()),
        )

    # -- entry point ------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # Orphans of a job (setsid + double fork) re-parent to us, so we still find them.
        proctree.become_subreaper()
        proctree.sweep_orphans(TOKEN_VAR)
        return self.serve_forever()

    def serve_forever(self) -> int:
        log.info("worker %s starting (prefix %s)", self.name, self.settings.prefix)
        while True:
            try:
                if not self._connect():
                    break
                if self._serve():
                    break
            except BROKER_ERRORS as exc:
                log.warning("lost the broker connection: %r; reconnecting", exc)
                self.link.drop()
                self.parked = None  # its tag died with the channel; the broker requeues it
        self.link.drop()
        log.info("worker %s stopped", self.name)
        return EXIT_OK

    def request_stop(self, grace_s: float | None = None) -> None:
        """Stop taking jobs; put the current one back if it outlasts the grace."""
        if self.stopping:
            self.shutdown_deadline = 0.0
            return
        self.stopping = True
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.shutdown_deadline = time.monotonic() + grace

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            log.warning("second %s: putting the current job back now", name)
        else:
            log.info("%s: shutting down (grace %.0f s for the current job)", name,
                     self.settings.shutdown_grace_s)
        self.request_stop()

    # -- connection -------------------------------------------------------------------
    def _give_up(self, _state: RetryCallState | None = None) -> bool:
        # Events still unsent (the put-back "queued", a final state) are worth waiting
        # for, but only within the shutdown grace: an absent broker must not hang us.
        return self.stopping and self.current is None and (
            not self.link.pending() or time.monotonic() >= self.shutdown_deadline)

    def _sleep(self, seconds: float) -> None:
        # Keep supervising the job (and shutdown) while the broker is away.
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self._give_up():
            self._housekeeping()
            time.sleep(min(TICK_S, max(0.0, end - time.monotonic())))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("broker unreachable (%s); retrying in %.1f s (attempt %d)",
                    exc.__class__.__name__ if exc else "?", delay, state.attempt_number)

    def _connect(self) -> bool:
        """Connect with backoff; False when shutting down with nothing left to do."""
        if self._give_up():
            return False
        retrying = Retrying(
            wait=wait_exponential(multiplier=0.5, min=0.5, max=15) + wait_random(0, 0.5),
            retry=retry_if_exception_type(BROKER_ERRORS),
            stop=self._give_up,
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self.link.open(self._on_control)
        except BROKER_ERRORS:
            return False  # gave up because we are stopping
        if self.current is not None:
            # The job kept running while we were away: it must stay controllable.
            self.link.bind_control(self.current)
        return True

    def _serve(self) -> bool:
        """Serve the connection until it fails (raises) or the worker is done (True)."""
        self.link.flush()
        while True:
            if self.current is None and self.parked is None:
                if self.stopping:
                    self.link.flush()
                    if self._give_up():
                        return True
                else:
                    self.link.consume(self._on_delivery)
            self.link.process(TICK_S)
            self._housekeeping()

    # -- every tick -------------------------------------------------------------------
    def _housekeeping(self) -> None:
        online = self.link.online()
        if online:
            self.link.flush()
        current = self.current
        if current is not None and current.done.is_set():
            self._finish(current)
        elif current is not None and self.stopping \
                and time.monotonic() >= self.shutdown_deadline \
                and not current.control.shutdown_requested:
            log.warning("job %s did not finish within the grace; putting it back",
                        current.job.job_id)
            current.control.request(Action.SHUTDOWN)
        if self.stopping and online:
            self.link.stop_consuming()
            if self.parked is not None:
                parked, self.parked = self.parked, None
                self.link.settle(parked, Settle.NACK)
        if self.parked is not None and time.monotonic() >= self.parked.next_try and online:
            parked, self.parked = self.parked, None
            self._begin(parked)
        self.schedule.tick()

    # -- deliveries -------------------------------------------------------------------
    def _on_delivery(self, channel: Any, method: Any, _props: Any, body: bytes) -> None:
        if self.stopping or self.current is not None or self.parked is not None:
            # Never two jobs at once; put it back for another worker.
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        try:
            job = JobMessage.decode(body)
            self.storage.job_dir(job.job_id)  # validates the id
        except (DecodeError, LabqError) as exc:
            log.error("undecodable job message dead-lettered: %s", exc)
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
        self._begin(Delivery(method.delivery_tag, self.link.generation, job))

    def _begin(self, d: Delivery) -> None:
        """Take the run lock and decide what the delivery means (internals.md, Worker)."""
        job_id = d.job.job_id
        self.storage.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        lock = open(self.storage.lock_path(job_id), "a+b")  # noqa: SIM115 - held across calls
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            if d.next_try == 0.0:
                log.info("job %s is still running elsewhere; parking its redelivery", job_id)
            d.next_try = time.monotonic() + PARK_POLL_S
            self.parked = d
            return
        d.lock = lock
        try:
            self._apply(d, plan_delivery(self.storage, self.settings, job_id, self.name))
        except BaseException:
            if self.current is not d:  # the lock must not outlive a delivery we gave up
                self._release(d)
            raise

    def _apply(self, d: Delivery, plan: Plan) -> None:
        job_id = d.job.job_id
        if plan.kind == PlanKind.RUN:
            self._start(d)
            return
        assert plan.record is not None
        if plan.kind == PlanKind.DUPLICATE:
            log.info("job %s already has an outcome; re-publishing it and acking", job_id)
        else:
            log.info("job %s ends without running: %s", job_id,
                     plan.record.error or "it was stopped before it ran")
            self.link.bind_control(d)
            self.storage.write_outcome(job_id, plan.record)
        event = plan.record.final_event(job_id, self.name)
        if event.worker == self.name:  # a duplicate's record may name another worker
            event = dataclasses.replace(event, worker_host=self.host)
        self.link.publish_event(event)
        self.link.flush()
        self.link.settle(d, plan.settle)
        self.link.unbind_control(d)
        self._release(d)

    def _start(self, d: Delivery) -> None:
        self.link.bind_control(d)
        d.attempt = self.storage.record_attempt(d.job.job_id, self.name)
        d.thread = threading.Thread(target=self._job_thread, args=(d,),
                                    name=f"job-{d.job.job_id[:8]}", daemon=True)
        self.current = d
        d.thread.start()
        self.link.unbind_released(keep=d.control_key)  # while the job runs
        # The consumer stays on: prefetch 1 holds the next delivery back until this one
        # is settled, and then it is here without a round trip. (After a reconnect
        # mid-job _serve consumes again only once this job is finished.)

    def _job_thread(self, d: Delivery) -> None:
        """Runs in the job thread: the job, then a wake-up call to the connection thread."""

        def emit(state: str, **fields: Any) -> None:
            d.n += 1
            self.link.publish_event(LifecycleEvent(
                job_id=d.job.job_id, seq=event_seq(d.attempt, d.n), state=state,
                attempt=d.attempt, worker=self.name, worker_host=self.host, **fields,
            ))
            self.link.wake()

        try:
            d.result = self.runner(d.job, self.settings, emit, d.control, attempt=d.attempt,
                                   worker=self.name, storage=self.storage, envs=self.envs,
                                   sandbox=self.sandbox)
        except Exception as exc:  # a bug in labq: still give the job an outcome
            log.exception("job %s crashed the runner", d.job.job_id)
            record = crash_record(d.attempt, self.name, exc)
            with contextlib.suppress(Exception):
                self.storage.write_outcome(d.job.job_id, record)
                emit(str(record.state), outcome=str(record.outcome), error=record.error)
            d.result = RunResult.FAILED
        finally:
            d.done.set()
            self.link.wake()

    def _finish(self, d: Delivery) -> None:
        """Connection thread: the job thread is done; record, publish, settle, release."""
        settle = settle_after(d.result)
        if settle == Settle.NACK:
            self.storage.record_attempt_end(d.job.job_id, d.attempt)
        if self.link.online():
            self.link.flush()  # raises when the broker is gone: we come back after reconnect
        self.link.settle(d, settle)
        self.link.release_control(d)
        self._release(d)
        self.current = None
        log.info("job %s done: %s", d.job.job_id, d.result)

    def _release(self, d: Delivery) -> None:
        if d.lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(d.lock, fcntl.LOCK_UN)
            d.lock.close()
            d.lock = None

    def _on_control(self, _channel: Any, _method: Any, _props: Any, body: bytes) -> None:
        try:
            message = ControlMessage.decode(body)
        except DecodeError as exc:
            log.warning("ignoring a bad control message: %s", exc)
            return
        d = self.current
        if d is None or d.job.job_id != message.job_id:
            log.info("control %s for job %s which this worker does not run",
                     message.action, message.job_id)
            return
        log.info("control: %s job %s", message.action, message.job_id)
        d.control.request(message.action)


def run(settings: Settings) -> int:
    """``labq worker``: run until SIGTERM/SIGINT; returns the process exit code."""
    setup_logging("worker", settings.log_level)
    protect_process()
    if settings.worker_nice > 0:
        # The backend answers people; a worker's bookkeeping can wait a moment. On a
        # host that runs both, this keeps uploads fast while every worker is busy.
        os.nice(min(19, settings.worker_nice))
    # pika logs every failed connection attempt at ERROR with a traceback; our own
    # backoff warnings say the same in one line.
    for name in ("pika.adapters.utils.connection_workflow",
                 "pika.adapters.utils.io_services_utils", "pika.adapters.blocking_connection"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        worker = Worker(settings)
    except (ConfigError, OSError) as exc:
        log.error("cannot start the worker: %s", exc)
        return EXIT_CONFIG
    try:
        return worker.run()
    except Exception:
        log.exception("the worker crashed")
        return EXIT_SOFTWARE
