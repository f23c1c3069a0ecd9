#!/bin/sh
# Prints the Python interpreter to build sidecar's virtualenv with:
#
#   "$(sh deploy/python.sh)" -m venv .venv
#
# sidecar spends most of its user-space CPU inside the interpreter, so how that
# interpreter was compiled shows: on these machines Debian's python3.11 (built with
# profile-guided and link-time optimisation, linked statically) runs 8-10% fewer
# instructions per request than a CPython compiled with default flags (what pyenv and
# asdf build unless told otherwise), and hot code 20-30% faster, with the same sidecar
# and the same packages (README, "Performance"). So the order is:
#   1. $PYTHON, when set (the operator's choice; refused, not passed over, when unusable);
#   2. the operating system's /usr/bin/python3, then /usr/bin/python3.13, 3.12 and 3.11
#      (Debian, Ubuntu and Fedora build theirs with PGO and LTO; a distribution whose
#      python3 is older may package a newer one beside it);
#   3. python3 on PATH.
# A candidate is taken when it is Python 3.11 or newer and can make a venv with pip
# (Debian keeps that in the python3-venv package); else the next one is tried.
set -eu

usable() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if [ -n "${PYTHON:-}" ]; then
    if ! usable "$PYTHON"; then
        echo "deploy/python.sh: PYTHON=$PYTHON is not a Python 3.11 or newer that can make a venv" >&2
        exit 1
    fi
    echo "$PYTHON"
    exit 0
fi
for candidate in /usr/bin/python3 /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11 \
    "$(command -v python3 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && usable "$candidate"; then
        echo "$candidate"
        exit 0
    fi
done
echo "deploy/python.sh: no Python 3.11 or newer that can make a venv (set PYTHON=/path/to/python3)" >&2
exit 1
