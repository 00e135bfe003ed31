# One image for every labq service: `labq backend` (REST API + web pages) and `labq worker`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LABQ_DATA_DIR=/data

WORKDIR /app
COPY . /app
# bubblewrap and slirp4netns: the job sandbox (workers run with LABQ_SANDBOX=required).
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap slirp4netns \
 && rm -rf /var/lib/apt/lists/*
RUN pip install '/app[postgres]' \
 && useradd --create-home --uid 1000 labq \
 && mkdir -p /data \
 && chown labq:labq /data

USER labq
EXPOSE 8080
CMD ["labq", "backend"]
