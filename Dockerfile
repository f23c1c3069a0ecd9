# syntax=docker/dockerfile:1
#
# sidecar: stream-correctness, usage and cost proxy in front of an LLM worker.
#
#   docker build -t sidecar .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#       -e SIDECAR_UPSTREAM=http://my-worker:8000 \
#       -v "$PWD/my-sidecar.yaml:/etc/sidecar/sidecar.yaml:ro" \
#       -v sidecar-ledger:/var/lib/sidecar \
#       sidecar
#
# The RUN steps are deploy/docker-run-steps.sh (bind-mounted, BuildKit), which
# CI also runs on the host: `sh deploy/docker-run-steps.sh ci`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: a venv with sidecar (its hot path compiled with mypyc: setup.py) and its
# runtime deps (uvloop h11 orjson pyyaml); the C compiler stays in this stage
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sidecar ./sidecar
COPY config ./config
RUN --mount=type=bind,source=deploy/docker-run-steps.sh,target=/tmp/docker-run-steps.sh \
    SRC=/src VENV=/opt/venv sh /tmp/docker-run-steps.sh build

# ---- final: the venv, a non-root user, config and ledger directories
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="Stream-correctness, usage and cost proxy in front of an OpenAI-compatible LLM worker"
RUN --mount=type=bind,source=deploy/docker-run-steps.sh,target=/tmp/docker-run-steps.sh \
    sh /tmp/docker-run-steps.sh runtime
COPY --from=builder /opt/venv /opt/venv
# /etc/sidecar/sidecar.yaml is the default config; the worker presets sit beside
# it (vllm.yaml, sglang.yaml, llama-cpp.yaml, ollama.yaml, tgi.yaml).
# Mount your own file over /etc/sidecar/sidecar.yaml, or pass `run -c <file>`.
COPY config/ /etc/sidecar/
# Inside a container the ports must listen on all interfaces; the worker is
# reached at SIDECAR_UPSTREAM (127.0.0.1:8000 fits a pod that shares the
# worker's network namespace, or --network host). The ledger goes to the
# /var/lib/sidecar volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml \
    SIDECAR_LISTEN=0.0.0.0:8080 \
    SIDECAR_ADMIN_LISTEN=0.0.0.0:9090 \
    SIDECAR_USAGE_LOG=/var/lib/sidecar/usage.jsonl
USER 10001:10001
WORKDIR /var/lib/sidecar
EXPOSE 8080 9090
# SIGTERM drains streams in flight (up to drain_timeout) then exits 0; give
# `docker stop -t` more than drain_timeout. SIGHUP reloads the config.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SIDECAR_ADMIN_LISTEN', '0.0.0.0:9090').rsplit(':', 1)[1]; urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=2)"]
# Exec form: the daemon is PID 1 and receives SIGTERM/SIGHUP itself.
ENTRYPOINT ["sidecar"]
CMD ["run", "-c", "/etc/sidecar/sidecar.yaml"]
