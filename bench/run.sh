#!/bin/sh
# sidecar vs nginx benchmark: bench/run.sh [--quick] [options of bench/run.py, see --help]
# Uses $SIDECAR_PYTHON, else the repo's .venv (created when missing, with the interpreter
# deploy/python.sh picks, and `pip install -e .`).
# nginx (Debian's nginx-light) is installed by bench/run.py when absent and we are root.
set -eu
cd "$(dirname "$0")/.."
PY="${SIDECAR_PYTHON:-}"
if [ -z "$PY" ]; then
    if [ ! -x .venv/bin/python ]; then
        base=$(sh deploy/python.sh)
        echo "bench: creating .venv ($base -m venv, pip install -e .)" >&2
        "$base" -m venv .venv
        .venv/bin/pip install -q -e .
    fi
    PY=.venv/bin/python
fi
exec "$PY" bench/run.py "$@"
