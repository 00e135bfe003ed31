"""docker-compose.yml run for real under rootful Podman: the images, the stack, teardown.

CI has no Docker engine and no container registry, so everything the stack runs on is
built here from Debian's packages: a ``debootstrap --variant=minbase`` root file system
imported as ``localhost/labq-ci/debian:bookworm``, and on it a Python base and RabbitMQ and
PostgreSQL images (``images/``) that keep the official images' interface. The labq image
is built from the repository's own Dockerfile by podman-compose, with the override
``compose.ci.yml`` naming those images. ``containers.conf`` is what this VM's podman needs.

Caching: the bootstrapped tarball lives in ``$LABQ_CI_CACHE`` (default
``/var/cache/labq-ci``) under a key of suite, variant, mirror and month; the imported image
carries that key as a label; podman's layer cache does the rest. A fresh machine builds
everything (about two minutes); a warm one only labq's last layer.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("LABQ_CI_CACHE", "/var/cache/labq-ci"))
#: The venv install.sh makes for podman-compose (a venv of its own, not labq's).
PODMAN_COMPOSE = CACHE / "podman-compose" / "bin" / "podman-compose"
CONTAINERS_CONF = HERE / "containers.conf"

SUITE, VARIANT = "bookworm", "minbase"
DEBIAN = "localhost/labq-ci/debian:bookworm"
#: image name -> folder under images/ (tags: the Debian package versions they carry).
BASES = {
    "localhost/labq-ci/python:3.11": "python",
    "localhost/labq-ci/rabbitmq:3.10": "rabbitmq",
    "localhost/labq-ci/postgres:15": "postgres",
}
KEY_LABEL = "labq-ci.key"


class Phases:
    """Wall-clock seconds of each phase, for the report the test prints."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - start, 1)

    def report(self) -> str:
        return ", ".join(f"{name} {secs:g} s" for name, secs in self.seconds.items())


def engine_env() -> dict[str, str]:
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return env


def run(cmd: list[str], *, timeout: float = 300, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run an engine command; on failure raise with the tail of what it said."""
    done = subprocess.run(cmd, env=engine_env(), capture_output=True, text=True,
                          timeout=timeout, input=input, stdin=None if input else
                          subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` exited {done.returncode}:\n"
                           f"{(done.stdout + done.stderr)[-4000:]}")
    return done


def why_not() -> str | None:
    """Why this machine cannot run the stack (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (rootful Podman runs the stack; CI runs as root)"
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool, path=engine_env()["PATH"]) is None:
            return f"{tool} is not installed (`make test-compose` installs it as root)"
    if not PODMAN_COMPOSE.exists():
        return f"podman-compose is not in {PODMAN_COMPOSE} (`make test-compose` installs it)"
    if not Path("/etc/ssl/certs/ca-certificates.crt").exists():
        return "no CA bundle at /etc/ssl/certs/ca-certificates.crt for pip in the build"
    return None


# -- images ---------------------------------------------------------------------------
def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (what debootstrap should fetch from)."""
    texts = [p.read_text(errors="replace") for p in
             [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
             if p.is_file()]
    for text in texts:
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s*$",
                                 text, re.MULTILINE):
            return match.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+\S+", text,
                                 re.MULTILINE):
            return match.group(1)
    return "http://deb.debian.org/debian"


def base_key(mirror: str) -> str:
    # The month: a cached root file system is refreshed (security updates) once a month.
    text = f"{SUITE} {VARIANT} {mirror} {time.strftime('%Y-%m')}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _image_label(image: str, label: str) -> str | None:
    done = run(["podman", "image", "inspect", "--format",
                f'{{{{index .Labels "{label}"}}}}', image], check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_debian() -> str:
    """The bootstrapped Debian base image; says where it came from."""
    mirror = debian_mirror()
    key = base_key(mirror)
    if _image_label(DEBIAN, KEY_LABEL) == key:
        return "cached image"
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"debian-{SUITE}-{VARIANT}-{key}.tar"
    source = "cached tarball"
    if not tarball.exists():
        source = f"debootstrap from {mirror}"
        rootfs = CACHE / f"rootfs-{key}"
        shutil.rmtree(rootfs, ignore_errors=True)
        try:
            run(["debootstrap", f"--variant={VARIANT}", SUITE, str(rootfs), mirror],
                timeout=900)
            partial = tarball.with_suffix(".part")
            run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."],
                timeout=300)
            partial.rename(tarball)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        for old in CACHE.glob(f"debian-{SUITE}-{VARIANT}-*.tar"):
            if old != tarball:
                old.unlink()
    run(["podman", "import", "--change", f"LABEL {KEY_LABEL}={key}",
         "--change", "CMD [\"/bin/bash\"]", str(tarball), DEBIAN], timeout=300)
    return source


def build_bases() -> None:
    """Python, RabbitMQ and PostgreSQL on the Debian base (podman's layer cache: a
    rebuild with nothing changed takes a second)."""
    for image, folder in BASES.items():
        run(["podman", "build", "--pull=never", "--network=host", "--label", "labq-ci=1",
             "--build-arg", f"DEBIAN_IMAGE={DEBIAN}", "-t", image, str(HERE / "images" / folder)],
            timeout=900)


def prune_images() -> None:
    """Drop the untagged leftovers of earlier labq-ci builds (only ours: by label)."""
    run(["podman", "image", "prune", "-f", "--filter", "label=labq-ci=1"], check=False)


# -- the stack ------------------------------------------------------------------------
class ComposeStack:
    """One podman-compose project of docker-compose.yml + compose.ci.yml."""

    def __init__(self, project: str, env_file: Path, workers: int) -> None:
        self.project = project
        self.env_file = env_file
        self.workers = workers

    def compose(self, *args: str, timeout: float = 600,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        # No pod (each service its own container, as with Docker); a private cgroup
        # namespace (docker-compose.yml's `cgroup: private`, which podman-compose drops).
        return run([str(PODMAN_COMPOSE), "--in-pod", "false",
                    "--podman-run-args=--cgroupns=private",
                    "-p", self.project, "--env-file", str(self.env_file),
                    "-f", str(REPO / "docker-compose.yml"), "-f", str(HERE / "compose.ci.yml"),
                    *args], timeout=timeout, check=check)

    def build(self) -> None:
        # One service: backend and worker share the image, and two builds at once on two
        # cores would only race each other.
        self.compose("build", "backend", timeout=1200)

    def up(self) -> None:
        # Podman 4.3 ignores `condition: service_healthy` and podman-compose's exit code
        # says little: the test waits for /readyz itself.
        self.compose("up", "-d", "--scale", f"worker={self.workers}", check=False)

    def container(self, service: str, index: int = 1) -> str:
        return f"{self.project}_{service}_{index}"

    def containers(self) -> list[str]:
        done = run(["podman", "ps", "-a", "--format", "{{.Names}}", "--filter",
                    f"label=io.podman.compose.project={self.project}"], check=False)
        return sorted(done.stdout.split())

    def exec(self, service: str, *cmd: str, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["podman", "exec", self.container(service), *cmd], timeout=timeout,
                   check=check)

    def healthy(self, container: str) -> bool:
        """The service's own healthcheck, run now (Podman 4.3 without systemd never runs
        it by itself)."""
        return run(["podman", "healthcheck", "run", container], check=False).returncode == 0

    def restart(self, service: str) -> None:
        run(["podman", "restart", "-t", "45", self.container(service)], timeout=180)

    def stop(self, service: str) -> None:
        run(["podman", "stop", "-t", "45", self.container(service)], timeout=180)

    def start(self, service: str) -> None:
        run(["podman", "start", self.container(service)], timeout=180)

    def logs(self) -> str:
        parts = []
        for name in self.containers():
            # Not `--tail`: podman 4.3 fails on a partial line of a restarted container.
            done = run(["podman", "logs", name], check=False)
            lines = (done.stdout + done.stderr).splitlines()[-80:]
            parts.append(f"===== {name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def leftovers(self) -> dict[str, list[str]]:
        """What of this project still exists: containers, pods, volumes, networks."""
        label = f"label=io.podman.compose.project={self.project}"
        found = {
            "containers": run(["podman", "ps", "-a", "-q", "--filter", label], check=False),
            "pods": run(["podman", "pod", "ps", "-q", "--filter", f"name={self.project}"],
                        check=False),
            "volumes": run(["podman", "volume", "ls", "-q", "--filter",
                            f"name={self.project}_"], check=False),
            "networks": run(["podman", "network", "ls", "-q", "--filter",
                             f"name={self.project}_"], check=False),
        }
        return {kind: done.stdout.split() for kind, done in found.items() if done.stdout.split()}

    def down(self) -> dict[str, list[str]]:
        """Remove everything of the project, whatever state it is in; return what is left
        (nothing, unless podman itself failed)."""
        self.compose("down", "-v", "-t", "10", timeout=300, check=False)
        # podman-compose 1.6 removes containers in parallel and may trip over its own
        # --requires links, leaving some behind: sweep by label and name until clean.
        for _ in range(3):
            left = self.leftovers()
            if not left:
                return {}
            if left.get("containers"):
                run(["podman", "rm", "-f", "-t", "5", *left["containers"]], check=False,
                    timeout=180)
            if left.get("pods"):
                run(["podman", "pod", "rm", "-f", *left["pods"]], check=False)
            if left.get("volumes"):
                run(["podman", "volume", "rm", "-f", *left["volumes"]], check=False)
            if left.get("networks"):
                run(["podman", "network", "rm", "-f", *left["networks"]], check=False)
        return self.leftovers()
