#!/bin/sh
# Prints the Python interpreter to build sidecar's virtualenv with:
#
#   "$(sh deploy/python.sh)" -m venv .venv
#
# sidecar spends most of its CPU inside the interpreter, so how that interpreter was
# compiled shows in every figure: on these machines Debian's python3.11 (built with
# profile-guided optimisation and link-time optimisation, linked statically) costs about
# 30% less CPU per forwarded event than a CPython compiled with default flags (what
# pyenv and asdf build unless told otherwise), with the same sidecar and the same
# packages (README, "Performance"). So the order is:
#   1. $PYTHON, when set (the operator's choice, used as it is);
#   2. the operating system's /usr/bin/python3 (Debian, Ubuntu and Fedora build theirs
#      with PGO and LTO);
#   3. python3 on PATH.
# A candidate is taken when it is Python 3.11 or newer and can make a venv with pip
# (Debian keeps that in the python3-venv package); else the next one is tried.
set -eu

usable() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
    exit 0
fi
for candidate in /usr/bin/python3 "$(command -v python3 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && usable "$candidate"; then
        echo "$candidate"
        exit 0
    fi
done
echo "deploy/python.sh: no Python 3.11 or newer that can make a venv (set PYTHON=/path/to/python3)" >&2
exit 1
