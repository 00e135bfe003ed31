"""The worker: one RabbitMQ connection, one job at a time (docs/internals.md, "Worker").

Threads:

* the **connection thread** (the main thread) owns the pika ``BlockingConnection``
  for the worker's whole life and keeps calling ``process_data_events``, so broker
  heartbeats are served while a job runs or its environment builds; it decodes
  deliveries, takes the run lock, publishes events, acks and reconnects;
* one **job thread** per job runs :func:`process_unit.runner.run_job`. It never
  touches pika: its lifecycle events go into an in-memory outbox that the
  connection thread flushes (woken by ``add_callback_threadsafe``), in order, with
  publisher confirms, after a reconnect if the broker was away.

A delivery is acked only after ``outcome.json`` was written and the final event
confirmed, and only when its tag belongs to the live channel: after a reconnect the
old tag is stale, and the broker's redelivery finds ``outcome.json`` and is acked as
a duplicate instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any

import pika
import pika.exceptions
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from labq.process_unit import proctree
from labq.process_unit.control import Control
from labq.process_unit.envcache import EnvCache
from labq.process_unit.jobbox import HostSandbox, write_report
from labq.process_unit.runner import run_job
from labq.process_unit.sandbox import TOKEN_VAR
from labq.shared.errors import ConfigError, DecodeError, LabqError
from labq.shared.hardening import protect_process
from labq.shared.lifecycle import Outcome, State
from labq.shared.logs import setup_logging
from labq.shared.messages import (
    SEQ_PER_ATTEMPT,
    ControlMessage,
    JobMessage,
    LifecycleEvent,
    StatusEvent,
    event_seq,
)
from labq.shared.settings import Settings
from labq.shared.storage import Storage
from labq.shared.topology import PERSISTENT, TRANSIENT, Topology, connect

log = logging.getLogger(__name__)

#: Exit codes of ``labq worker``.
EXIT_OK = 0
EXIT_SOFTWARE = 70  # an unexpected error inside the worker
EXIT_CONFIG = 78  # a setting cannot be used

#: Seconds between lock polls of a parked redelivery.
PARK_POLL_S = 1.0
#: Seconds between sweeps for leftover job processes of dead workers.
SWEEP_S = 2.0
#: process_data_events slice: how quickly the loop notices its own work.
TICK_S = 0.2
BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)


def worker_name(settings: Settings) -> str:
    return settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Delivery:
    """One job delivery and, once it runs, everything about its run."""

    tag: int
    generation: int  # which channel it came on; a different one means a stale tag
    job: JobMessage
    lock: IO[bytes] | None = None
    next_try: float = 0.0
    attempt: int = 0
    n: int = 0  # lifecycle events emitted in this attempt
    control: Control = field(default_factory=Control)
    thread: threading.Thread | None = None
    result: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    control_key: str = ""


#: How often a worker touches its sandbox report (the backend drops reports gone stale).
REPORT_EVERY_S = 30.0


class Worker:
    def __init__(self, settings: Settings) -> None:
        # The sandbox decides the work dir and the job interpreter: use its settings.
        self.sandbox = HostSandbox.start(settings)
        settings = self.sandbox.settings
        self.settings = settings
        self.storage = Storage(settings.data_dir).ensure()
        self.topology = Topology.from_settings(settings)
        self.name = worker_name(settings)
        self.envs = EnvCache(settings, self.storage, self.sandbox.build_box())
        self._report_path = write_report(settings.data_dir, self.name, self.sandbox.report())
        self.conn: pika.BlockingConnection | None = None
        self.channel: Any = None
        self.generation = 0
        self.consumer_tag: str | None = None
        self.control_queue: str | None = None
        self._outbox: deque[tuple[str, bytes, pika.BasicProperties]] = deque()
        self._outbox_lock = threading.Lock()
        self.current: Delivery | None = None
        self.parked: Delivery | None = None
        self.stopping = False
        self.shutdown_deadline = 0.0
        self._next_status = 0.0
        self._next_sweep = 0.0
        self._next_report = 0.0

    # -- entry point ------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # Orphans of a job (setsid + double fork) re-parent to us, so we still find them.
        proctree.become_subreaper()
        proctree.sweep_orphans(TOKEN_VAR)
        log.info("worker %s starting (prefix %s)", self.name, self.settings.prefix)
        while True:
            try:
                if not self._connect():
                    break
                if self._serve():
                    break
            except BROKER_ERRORS as exc:
                log.warning("lost the broker connection: %r; reconnecting", exc)
                self._drop_connection()
        self._drop_connection()
        log.info("worker %s stopped", self.name)
        return EXIT_OK

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stopping:
            log.warning("second %s: putting the current job back now", signal.Signals(signum).name)
            self.shutdown_deadline = 0.0
            return
        log.info("%s: shutting down (grace %.0f s for the current job)",
                 signal.Signals(signum).name, self.settings.shutdown_grace_s)
        self.stopping = True
        self.shutdown_deadline = time.monotonic() + self.settings.shutdown_grace_s

    # -- connection -------------------------------------------------------------
    def _give_up(self, _state: RetryCallState) -> bool:
        # Events still unsent (the put-back "queued", a final state) are worth waiting
        # for, but only within the shutdown grace: an absent broker must not hang us.
        return self.stopping and self.current is None and (
            not self._outbox or time.monotonic() >= self.shutdown_deadline)

    def _sleep(self, seconds: float) -> None:
        # Keep supervising the job (and shutdown) while the broker is away.
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self._give_up(None):  # type: ignore[arg-type]
            self._housekeeping()
            time.sleep(min(TICK_S, max(0.0, end - time.monotonic())))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("broker unreachable (%s); retrying in %.1f s (attempt %d)",
                    exc.__class__.__name__ if exc else "?", delay, state.attempt_number)

    def _connect(self) -> bool:
        """Connect with backoff; False when shutting down with nothing left to do."""
        if self._give_up(None):  # type: ignore[arg-type]
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
                    self._open()
        except BROKER_ERRORS:
            return False  # gave up because we are stopping
        return True

    def _open(self) -> None:
        conn = connect(self.settings, f"labq-worker {self.name}")
        try:
            channel = conn.channel()
            channel.confirm_delivery()
            self.topology.declare_all(channel)
            channel.basic_qos(prefetch_count=1)
            declared = channel.queue_declare("", exclusive=True, auto_delete=True)
            control_queue = declared.method.queue
            channel.basic_consume(control_queue, self._on_control, auto_ack=True)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self.conn, self.channel, self.control_queue = conn, channel, control_queue
        self.generation += 1
        self.consumer_tag = None
        log.info("connected to the broker (channel generation %d)", self.generation)
        if self.current is not None:
            # The job kept running while we were away: it must stay controllable.
            self._bind_control(self.current)

    def _drop_connection(self) -> None:
        conn, self.conn, self.channel = self.conn, None, None
        self.consumer_tag = None
        self.control_queue = None
        if self.parked is not None:  # its tag died with the channel; the broker requeues it
            self.parked = None
        if conn is not None:
            with contextlib.suppress(Exception):
                if conn.is_open:
                    conn.close()

    def _online(self) -> bool:
        return self.channel is not None and self.channel.is_open

    def _serve(self) -> bool:
        """Serve the connection until it fails (raises) or the worker is done (True)."""
        self._flush()
        while True:
            if self.current is None and self.parked is None:
                if self.stopping:
                    self._flush()
                    if self._give_up(None):  # type: ignore[arg-type]
                        return True
                else:
                    self._consume()
            assert self.conn is not None
            self.conn.process_data_events(time_limit=TICK_S)
            if not self.channel.is_open:
                # The broker closed our channel (e.g. its consumer timeout bit) without
                # closing the connection; pika does not raise for that. Start over.
                raise pika.exceptions.ChannelClosed(0, "the broker closed the channel")
            self._housekeeping()

    def _consume(self) -> None:
        if self.consumer_tag is None and self._online():
            self.consumer_tag = self.channel.basic_consume(
                self.topology.jobs_queue, self._on_delivery, auto_ack=False
            )

    def _stop_consuming(self) -> None:
        if self.consumer_tag is not None and self._online():
            tag, self.consumer_tag = self.consumer_tag, None
            self.channel.basic_cancel(tag)

    # -- periodic work ----------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_report:  # the backend shows reports touched recently
            self._next_report = now + REPORT_EVERY_S
            with contextlib.suppress(OSError):
                os.utime(self._report_path)
        if self._online():
            self._flush()
        current = self.current
        if current is not None and current.done.is_set():
            self._finish(current)
        elif current is not None:
            if self.stopping and now >= self.shutdown_deadline \
                    and not current.control.shutdown_requested:
                log.warning("job %s did not finish within the grace; putting it back",
                            current.job.job_id)
                current.control.request("shutdown")
            if now >= self._next_sweep and not current.control.stop_requested \
                    and self.storage.is_cancelled(current.job.job_id):
                # The stop may have been asked while our channel was down (its control
                # message unroutable): the marker on the data dir still reaches us.
                log.info("job %s has a stop marker; stopping it", current.job.job_id)
                current.control.request("stop")
            if now >= self._next_status and self._online():
                self._next_status = now + self.settings.status_interval_s
                self._publish_status(current)
        if self.stopping and self._online():
            self._stop_consuming()
            if self.parked is not None:
                parked, self.parked = self.parked, None
                self._settle(parked, "nack")
        if self.parked is not None and now >= self.parked.next_try and self._online():
            parked, self.parked = self.parked, None
            self._begin(parked)
        if now >= self._next_sweep:
            # Also while busy: an orphan of a SIGKILLed worker on this host should not
            # keep running until some worker happens to be idle.
            self._next_sweep = now + SWEEP_S
            if self.current is None:  # a running job's Popen must reap its own child
                proctree.reap_zombies()
            proctree.sweep_orphans(TOKEN_VAR)

    # -- deliveries ---------------------------------------------------------------
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
        self._begin(Delivery(method.delivery_tag, self.generation, job))

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
            self._decide(d)
        except BaseException:
            if self.current is not d:  # the lock must not outlive a delivery we gave up
                self._release(d)
            raise

    def _decide(self, d: Delivery) -> None:
        """With the run lock held: duplicate, cancelled, poison, or run it."""
        job_id = d.job.job_id
        record = self.storage.read_outcome(job_id)
        if record is not None:
            log.info("job %s already has an outcome; re-publishing it and acking", job_id)
            self._publish_event(self._final_event(job_id, record))
            self._flush()
            self._settle(d, "ack")
            self._release(d)
            return
        self._bind_control(d)
        if self.storage.is_cancelled(job_id):
            log.info("job %s was stopped before it ran", job_id)
            self._end_without_run(d, State.STOPPED, Outcome.CANCELLED, None, "ack")
            return
        lost = self.storage.lost_attempts(job_id)
        if lost >= self.settings.max_attempts:
            error = f"the worker running this job was lost {lost} times; giving up"
            log.error("job %s: %s", job_id, error)
            self._end_without_run(d, State.FAILED, Outcome.FAILED, error, "reject")
            return
        d.attempt = self.storage.record_attempt(job_id, self.name)
        d.thread = threading.Thread(target=self._job_thread, args=(d,),
                                    name=f"job-{job_id[:8]}", daemon=True)
        self.current = d
        d.thread.start()
        # No deliveries while busy (prefetch 1 holds them back too); after a reconnect
        # mid-job we only consume again once this job is finished.
        self._stop_consuming()

    def _end_without_run(self, d: Delivery, state: State, outcome: Outcome,
                         error: str | None, settle: str) -> None:
        job_id = d.job.job_id
        attempt = self.storage.attempts(job_id)
        record = {"state": str(state), "outcome": str(outcome), "exit_code": None,
                  "error": error, "attempt": attempt, "worker": self.name, "at": time.time()}
        self.storage.write_outcome(job_id, record)
        self._publish_event(self._final_event(job_id, record))
        self._flush()
        self._settle(d, settle)
        self._unbind_control(d)
        self._release(d)

    def _final_event(self, job_id: str, record: dict[str, Any]) -> LifecycleEvent:
        attempt = int(record.get("attempt") or 0)
        # Above every event the attempt published, so a backend that missed it applies it.
        return LifecycleEvent(
            job_id=job_id, seq=event_seq(attempt, SEQ_PER_ATTEMPT - 1), state=record["state"],
            attempt=attempt, outcome=record.get("outcome"), exit_code=record.get("exit_code"),
            error=record.get("error"), worker=record.get("worker") or self.name,
            at=float(record.get("at") or time.time()),
            peak_rss_mb=record.get("peak_rss_mb"), cpu_s=record.get("cpu_s"),
        )

    def _job_thread(self, d: Delivery) -> None:
        """Runs in the job thread: the job, then a wake-up call to the connection thread."""

        def emit(state: str, **fields: Any) -> None:
            d.n += 1
            self._publish_event(LifecycleEvent(
                job_id=d.job.job_id, seq=event_seq(d.attempt, d.n), state=state,
                attempt=d.attempt, worker=self.name, **fields,
            ))
            self._wake()

        try:
            d.result = run_job(d.job, self.settings, emit, d.control, attempt=d.attempt,
                               worker=self.name, storage=self.storage, envs=self.envs,
                               sandbox=self.sandbox)
        except Exception as exc:  # a bug in labq: still give the job an outcome
            log.exception("job %s crashed the runner", d.job.job_id)
            error = f"internal error in the labq worker: {exc!r}"
            with contextlib.suppress(Exception):
                self.storage.write_outcome(d.job.job_id, {
                    "state": "failed", "outcome": "failed", "exit_code": None, "error": error,
                    "attempt": d.attempt, "worker": self.name, "at": time.time()})
                emit("failed", outcome="failed", error=error)
            d.result = "failed"
        finally:
            d.done.set()
            self._wake()

    def _finish(self, d: Delivery) -> None:
        """Connection thread: the job thread is done; record, publish, ack, release."""
        if d.result == "queued":
            self.storage.record_attempt_end(d.job.job_id, d.attempt)
            settle = "nack"
        else:
            settle = "ack"
        if self._online():
            self._flush()  # raises when the broker is gone: we come back here after reconnect
        self._settle(d, settle)
        self._unbind_control(d)
        self._release(d)
        self.current = None
        log.info("job %s done: %s", d.job.job_id, d.result)

    def _settle(self, d: Delivery, how: str) -> None:
        """Ack / nack(requeue) / reject(no requeue) — only on the channel the tag came on."""
        if d.generation != self.generation or not self._online():
            log.info("not settling job %s: its delivery tag belongs to a dead channel",
                     d.job.job_id)
            return
        if how == "ack":
            self.channel.basic_ack(d.tag)
        elif how == "nack":
            self.channel.basic_nack(d.tag, requeue=True)
        else:
            self.channel.basic_reject(d.tag, requeue=False)

    def _release(self, d: Delivery) -> None:
        if d.lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(d.lock, fcntl.LOCK_UN)
            d.lock.close()
            d.lock = None

    # -- control ------------------------------------------------------------------
    def _bind_control(self, d: Delivery) -> None:
        d.control_key = f"{d.job.job_id}.control"
        if self._online() and self.control_queue:
            self.channel.queue_bind(self.control_queue, self.topology.control_exchange,
                                    d.control_key)

    def _unbind_control(self, d: Delivery) -> None:
        if d.control_key and self._online() and self.control_queue:
            self.channel.queue_unbind(self.control_queue, self.topology.control_exchange,
                                      d.control_key)
        d.control_key = ""

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

    # -- publishing ---------------------------------------------------------------
    def _publish_event(self, event: LifecycleEvent) -> None:
        props = pika.BasicProperties(content_type="application/json", delivery_mode=PERSISTENT)
        with self._outbox_lock:
            self._outbox.append((event.routing_key, event.encode(), props))

    def _wake(self) -> None:
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.add_callback_threadsafe(self._flush)

    def _flush(self) -> None:
        """Publish buffered lifecycle events in order, each confirmed (connection thread)."""
        if not self._online():
            return
        while True:
            with self._outbox_lock:
                if not self._outbox:
                    return
                routing_key, body, props = self._outbox[0]
            try:
                self.channel.basic_publish(self.topology.events_exchange, routing_key, body,
                                           props)
            except pika.exceptions.NackError:
                log.warning("broker refused an event; will retry")
                return
            with self._outbox_lock:
                self._outbox.popleft()

    def _publish_status(self, d: Delivery) -> None:
        status = d.control.status
        if status is None or status.state not in (State.STARTED, State.PAUSED):
            return
        event = StatusEvent(job_id=d.job.job_id, state=status.state,
                            elapsed_s=status.elapsed_s, attempt=d.attempt, worker=self.name,
                            memory_mb=status.memory_mb, cpu_s=status.cpu_s)
        props = pika.BasicProperties(content_type="application/json",
                                     delivery_mode=TRANSIENT)
        with contextlib.suppress(pika.exceptions.NackError, pika.exceptions.UnroutableError):
            self.channel.basic_publish(self.topology.events_exchange, event.routing_key,
                                       event.encode(), props)


def run(settings: Settings) -> int:
    """``labq worker``: run until SIGTERM/SIGINT; returns the process exit code."""
    setup_logging("worker", settings.log_level)
    protect_process()
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
