"""A real job's webhook: sent when it ends, retried when the receiver fails, and never
able to change the job's outcome (a receiver that is not there at all)."""

from __future__ import annotations

import pytest
from helpers import LabqSystem, Receiver, free_port, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hooked(broker: str, tmp_path_factory: pytest.TempPathFactory):
    system = LabqSystem(tmp_path_factory.mktemp("hooks"), workers=1,
                        env={"LABQ_WEBHOOK_ALLOW_PRIVATE": "1"})
    try:
        system.start()
        yield system
    finally:
        system.stop()


def test_a_finished_job_posts_to_its_notify_url_again_after_a_failure(hooked: LabqSystem):
    receiver = Receiver([502])  # the first try fails; the retry (after 1 s) gets through
    try:
        job = hooked.submit({"code.py": "print('hi')\n",
                             "labq.toml": f'notify_url = "{receiver.url}"\n'})
        done = hooked.wait_done(job["id"])
        assert done["outcome"] == "succeeded"
        wait_until(lambda: len(receiver.bodies) == 2, timeout=20, message="the retry")
        assert receiver.bodies[-1]["job"]["id"] == job["id"]
        assert receiver.bodies[-1]["job"]["outcome"] == "succeeded"
    finally:
        receiver.close()


def test_a_webhook_that_cannot_be_delivered_never_affects_the_job(hooked: LabqSystem):
    nobody_home = f"http://127.0.0.1:{free_port()}/hook"
    job = hooked.submit({"code.py": "print('hi')\n",
                         "labq.toml": f'notify_url = "{nobody_home}"\n'})
    done = hooked.wait_done(job["id"])
    assert (done["state"], done["outcome"]) == ("stopped", "succeeded")
    # and the backend goes on serving while it retries in the background
    assert hooked.http.get(hooked.api("/healthz"), timeout=5).status_code == 200
