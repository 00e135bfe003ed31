# One image for every labq service: `labq backend` (REST API + web pages) and `labq worker`.
#
#   docker build -t labq .                     # on the official python:3.11-slim
#   docker build --build-arg BASE_IMAGE=... .  # any Debian-like image with Python 3.11+
#
# labq is installed with a plain `pip install .` (not editable), as on a server. CI builds
# it on local images (tests/compose/) and hands pip its CA bundle as the optional build
# secret `ca_bundle`; without that secret pip uses its own certificates, as usual.
# (`RUN --mount` needs BuildKit: Docker's default builder, and Podman's buildah.)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    LABQ_DATA_DIR=/data

# bubblewrap and slirp4netns: the job sandbox (workers run with LABQ_SANDBOX=required).
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap slirp4netns \
 && rm -rf /var/lib/apt/lists/*

# The dependencies first, in a layer of their own: a change to labq's code rebuilds only
# the last step, not every wheel.
# postgres: the database driver; s3: boto3, for bundles and results in a bucket
# (LABQ_STORAGE=s3). A lab that needs neither can build with LABQ_EXTRAS=postgres.
ARG LABQ_EXTRAS=postgres,s3
COPY pyproject.toml /tmp/labq-deps/
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && python3 -c 'import tomllib; p = tomllib.load(open("/tmp/labq-deps/pyproject.toml", "rb"))["project"]; extras = "'"$LABQ_EXTRAS"'".split(","); print("\n".join(p["dependencies"] + [d for e in extras if e for d in p["optional-dependencies"][e]]))' \
      > /tmp/labq-deps/requirements.txt \
 && pip install -r /tmp/labq-deps/requirements.txt \
 && rm -rf /tmp/labq-deps

COPY . /src
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && pip install "/src[$LABQ_EXTRAS]" \
 && rm -rf /src \
 && python3 -c 'import labq.backend.server, labq.backend.app, labq.consumer.worker' \
 && labq --help >/dev/null \
 && useradd --create-home --uid 1000 labq \
 && mkdir -p /data \
 && chown labq:labq /data

WORKDIR /data
USER labq
EXPOSE 8080
CMD ["labq", "backend"]
