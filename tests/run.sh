#!/usr/bin/env bash
# The one test command (README, .ci/run): installs everything the tests need on a fresh
# machine, builds the real llama.cpp worker (cached under ~/.cache/sidecar-tests), then runs
# ruff, mypy and the whole pytest suite once per build of sidecar: the pure-Python package
# (what an editable install runs) and the mypyc-compiled one (what `pip install .` and the
# Docker image run; setup.py). SIDECAR_TEST_BUILDS picks the builds ("pure compiled" by
# default). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
# the compiled build (setup.py, mypyc) needs the interpreter's C headers
py_include=$("$(sh deploy/python.sh)" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -e "$py_include/Python.h" ] || case $py_include in /usr/include/*) need_apt+=("$(basename "$py_include")-dev") ;; esac
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]} from Debian"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$(sh deploy/python.sh)" -m venv .venv  # the interpreter: see deploy/python.sh
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# setuptools>=77: the compiled build runs setup.py in this venv (build_ext --inplace), and an
# older setuptools rejects pyproject.toml's license string
.venv/bin/python -m pip install -q -e '.[test]' 'setuptools>=77'

echo "== Dockerfile RUN steps, run as a plain script"
# With this venv's interpreter, and the venv its build step installs sidecar into, compiled
# (pip install, SIDECAR_MYPYC=1), kept: the compiled test run below uses those modules.
installed=$(mktemp -d)
trap 'rm -rf "$installed"' EXIT
PYTHON="$PWD/.venv/bin/python" VENV="$installed/venv" sh deploy/docker-run-steps.sh ci

echo "== building the real worker (llama.cpp llama-server; cached)"
bash tests/realworker/build.sh
export SIDECAR_REQUIRE_REALWORKER="${SIDECAR_REQUIRE_REALWORKER:-1}"

echo "== ruff"
.venv/bin/ruff check sidecar tests bench

echo "== mypy"
.venv/bin/mypy

# The compiled run puts compiled modules in place (sidecar/*.so next to the .py files, which
# they shadow) and removes them afterwards, so the checkout is left pure. They are the ones the
# Docker build step compiled, copied from its venv when the package it installed there is
# still the checkout's sidecar/ (bundled/ is config/; compared after the copy, and
# tests/conftest.py refuses a .py edited later than the copies), else compiled here.
remove_compiled() { find sidecar -name '*.so' -delete; rm -f ./*__mypyc*.so; }
trap 'remove_compiled; rm -rf "$installed"' EXIT
copy_installed_build() {
  local site
  site=$("$installed/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])') || return 1
  (cd "$site" && find sidecar -name '*.so' -exec cp --parents {} "$OLDPWD" \; && cp ./*__mypyc*.so "$OLDPWD") &&
    diff -r -q -x __pycache__ -x '*.so' -x bundled sidecar "$site/sidecar" >/dev/null && return 0
  remove_compiled
  return 1
}
failed=()
for build in ${SIDECAR_TEST_BUILDS:-pure compiled}; do
  case $build in
    pure) remove_compiled ;;
    compiled)
      if copy_installed_build; then
        echo "== compiled: the modules the Docker build step compiled (pip install .)"
      else
        echo "== compiling the hot path with mypyc (setup.py build_ext --inplace)"
        SIDECAR_MYPYC=1 .venv/bin/python setup.py -q build_ext --inplace >/dev/null
      fi ;;
    *) echo "SIDECAR_TEST_BUILDS: unknown build '$build' (pure, compiled)" >&2; exit 2 ;;
  esac
  echo "== pytest ($build)"
  SIDECAR_TEST_BUILD=$build .venv/bin/python -m pytest -q -p no:cacheprovider "$@" || failed+=("$build")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "== pytest failed on: ${failed[*]}" >&2
  exit 1
fi
