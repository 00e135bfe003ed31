"""The process unit: runs one job (workspace, environment cache, supervised subprocess).

* :mod:`process_unit.runner` — one job end to end (``run_job``);
* :mod:`process_unit.envcache` — job environments built with uv, cached and evicted;
* :mod:`process_unit.supervisor` / :mod:`process_unit.proctree` — the job's process
  tree: start, pause, resume, stop, memory, exit classification;
* :mod:`process_unit.sandbox` — the job's argv and environment, built from scratch;
* :mod:`process_unit.launch` — the launcher that arms PR_SET_PDEATHSIG before exec;
* :mod:`process_unit.results` — ``output/`` into results.zip and results/;
* :mod:`process_unit.control` — the mailbox between the connection and job threads.

Imports only :mod:`shared`; knows nothing of RabbitMQ.
"""
