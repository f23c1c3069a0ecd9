#!/usr/bin/env bash
# The one test command (README, .ci/run): installs everything the tests need on a fresh
# machine, builds the real llama.cpp worker (cached under ~/.cache/sidecar-tests), then runs
# ruff, mypy and the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]} from Debian"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$(sh deploy/python.sh)" -m venv .venv  # the interpreter: see deploy/python.sh
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'

echo "== Dockerfile RUN steps, run as a plain script"
sh deploy/docker-run-steps.sh ci

echo "== building the real worker (llama.cpp llama-server; cached)"
bash tests/realworker/build.sh
export SIDECAR_REQUIRE_REALWORKER="${SIDECAR_REQUIRE_REALWORKER:-1}"

echo "== ruff"
.venv/bin/ruff check sidecar tests bench

echo "== mypy"
.venv/bin/mypy

echo "== pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
