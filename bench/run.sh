#!/bin/sh
# sidecar vs nginx benchmark: bench/run.sh [--quick] [options of bench/run.py, see --help]
#
# It measures sidecar as `pip install .` installs it: compiled with mypyc (setup.py). That
# install lives in .bench-venv (made, and remade whenever sidecar's source changes, with the
# interpreter deploy/python.sh picks). SIDECAR_BENCH_BUILD=pure measures the pure-Python
# package instead, from the repo's .venv (`pip install -e .`); SIDECAR_PYTHON measures
# whatever sidecar that interpreter imports.
# nginx (Debian's nginx-light) is installed by bench/run.py when absent and we are root.
set -eu
cd "$(dirname "$0")/.."
PY="${SIDECAR_PYTHON:-}"
if [ -z "$PY" ]; then
    case ${SIDECAR_BENCH_BUILD:-compiled} in
        compiled) venv=.bench-venv ;;
        pure) venv=.venv ;;
        *) echo "bench: SIDECAR_BENCH_BUILD must be compiled or pure" >&2; exit 2 ;;
    esac
    if [ ! -x "$venv/bin/python" ]; then
        base=$(sh deploy/python.sh)
        echo "bench: creating $venv ($base -m venv)" >&2
        "$base" -m venv "$venv"
    fi
    if [ "$venv" = .venv ]; then
        "$venv/bin/python" -c 'import sidecar' 2>/dev/null || "$venv/bin/python" -m pip install -q -e .
    else
        source_hash=$(find setup.py pyproject.toml sidecar config -name '*.py' -o -name '*.toml' -o -name '*.yaml' | sort | xargs cat | sha256sum | cut -c1-16)
        if [ "$(cat "$venv/.sidecar-source" 2>/dev/null || true)" != "$source_hash" ]; then
            echo "bench: installing this tree, compiled, into $venv (pip install .; about a minute)" >&2
            SIDECAR_MYPYC=1 "$venv/bin/python" -m pip install -q --disable-pip-version-check .
            echo "$source_hash" > "$venv/.sidecar-source"
        fi
    fi
    PY=$venv/bin/python
fi
exec "$PY" bench/run.py "$@"
