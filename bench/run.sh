#!/bin/sh
# sidecar vs nginx benchmark: bench/run.sh [--quick] [options of bench/run.py, see --help]
# Uses $SIDECAR_PYTHON, else the repo's .venv (created with `pip install -e .` when missing).
# nginx (Debian's nginx-light) is installed by bench/run.py when absent and we are root.
set -eu
cd "$(dirname "$0")/.."
PY="${SIDECAR_PYTHON:-}"
if [ -z "$PY" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "bench: creating .venv (python3 -m venv, pip install -e .)" >&2
        python3 -m venv .venv
        .venv/bin/pip install -q -e .
    fi
    PY=.venv/bin/python
fi
exec "$PY" bench/run.py "$@"
