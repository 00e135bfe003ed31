"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1, a free port.

``MotoS3.start()`` runs ``python -m moto.server`` as a subprocess (the dev extra installs
``moto[server]``), waits until it answers, and makes a bucket; ``env()`` gives the
``LABQ_*`` and ``AWS_*`` variables a labq process needs to use it; ``stop()`` ends it.
Where moto is not installed the tests that need it are skipped, saying so (under CI it
is a failure: the dev extra must be installed there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import free_port, wait_until

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "labq-test", "AWS_SECRET_ACCESS_KEY": "labq-test-secret",
               "AWS_DEFAULT_REGION": REGION}


def require_moto() -> None:
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        message = f"moto[server] and boto3 are not installed ({exc}): pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class MotoS3:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = f"labq-{uuid.uuid4().hex[:12]}"
        self.log = log_dir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoS3:
        require_moto()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        wait_until(self._answers, timeout=60, message=f"moto's S3 server on {self.url}")
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"moto's server exited:\n{self.log.read_text()[-3000:]}")
        try:
            return requests.get(self.url, timeout=2).status_code < 500
        except requests.RequestException:
            return False

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION).client("s3", endpoint_url=self.url)

    def env(self, prefix: str = "") -> dict[str, str]:
        return {**CREDENTIALS, "LABQ_STORAGE": "s3", "LABQ_S3_BUCKET": self.bucket,
                "LABQ_S3_ENDPOINT_URL": self.url, "LABQ_S3_PREFIX": prefix}

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
