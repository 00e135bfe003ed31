"""The multi-host test: four hosts in Linux network namespaces (tests/multihost/cluster.sh),
a three-node RabbitMQ cluster with quorum queues, PostgreSQL, the backend, workers on two
hosts, and the faults of tests/multihost/driver.py. It needs root, ``ip netns``,
rabbitmq-server and PostgreSQL's server binaries; without them it is skipped saying which
is missing, except under CI on a root machine, where it must run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fault

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "cluster.sh"
RUN_LIMIT_S = 280


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "LABQ_BIN": str(Path(sys.executable).with_name("labq")),
            "LQ_LOG_DIR": str(tmp / "logs")}


def _leftovers(run_id: str, run_dir: str) -> list[str]:
    """What the run left on the machine: namespaces, /etc/netns entries, processes."""
    left = [f"netns {n}" for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                  text=True).stdout.split()
            if n.startswith(run_id)]
    left += [f"/etc/netns/{p.name}" for p in Path("/etc/netns").glob(f"{run_id}*")]
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and run_dir.encode() in (proc / "cmdline").read_bytes():
                left.append(f"process {proc.name}")
        except OSError:
            continue
    if Path(run_dir).exists():
        left.append(run_dir)
    return left


@pytest.mark.timeout(RUN_LIMIT_S + 30)
def test_jobs_survive_a_lost_worker_host_a_lost_broker_node_and_a_backend_restart(tmp_path):
    env = _env(tmp_path)
    pre = subprocess.run(["bash", str(SCRIPT), "preflight"], capture_output=True, text=True,
                         env=env)
    if pre.returncode != 0:
        reason = f"the multi-host test cannot run here: {pre.stdout.strip() or pre.stderr}"
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(reason + " (under CI, as root, it must run)")
        pytest.skip(reason)
    try:
        run = subprocess.run(["timeout", "-s", "TERM", str(RUN_LIMIT_S), "bash", str(SCRIPT),
                              "run"], capture_output=True, text=True, env=env,
                             timeout=RUN_LIMIT_S + 20)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"cluster.sh did not end within {RUN_LIMIT_S + 20} s: {exc.stdout!r}")
    output = run.stdout + run.stderr
    print(output[-20000:])  # the figures, and on failure the services' log tails
    found = re.search(r"LQ_ID=(\S+) LQ_RUN=(\S+)", run.stdout)
    assert found, "cluster.sh did not start a cluster"
    assert run.returncode == 0, f"the multi-host run failed (logs in {tmp_path / 'logs'}):\n" \
        + "\n".join(line for line in output.splitlines() if "driver:" in line)
    figures = dict(re.findall(r"^FIGURE (\S+) (.+)$", run.stdout, re.M))
    assert figures["jobs_total"] == figures["jobs_succeeded_once"]
    assert not _leftovers(*found.groups()), "the run left things behind"
