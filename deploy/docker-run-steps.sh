#!/bin/sh
# The Dockerfile's RUN steps, as a plain script.
#
# The Dockerfile runs exactly this file (bind-mounted) for its two RUN steps,
# and CI runs the same steps on the host, in temp dirs, so a broken install
# line fails CI even though no docker engine runs there:
#
#   sh deploy/docker-run-steps.sh build     # builder stage: C compiler, venv + compiled sidecar + smoke test
#   sh deploy/docker-run-steps.sh runtime   # final stage: user, directories
#   sh deploy/docker-run-steps.sh ci        # both, on the host, in a temp dir (root only)
#
# Variables (defaults are the image's paths):
#   SRC   source tree to install            (/src)
#   VENV  virtualenv to create              (/opt/venv; `ci`: one in its temp dir, removed after)
#   ROOT  filesystem prefix for `runtime`   (empty: /)
#   PYTHON interpreter for the venv         (python3)
set -eu

SIDECAR_UID=10001

step_build() {
    src=${SRC:-/src}
    venv=${VENV:-/opt/venv}
    # The image's sidecar is compiled (setup.py, SIDECAR_MYPYC=1: a failed compile fails the
    # build); the slim base image has no C compiler, so the builder stage installs one.
    if ! command -v cc >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
        rm -rf /var/lib/apt/lists/*
    fi
    "${PYTHON:-python3}" -m venv "$venv"
    SIDECAR_MYPYC=1 "$venv/bin/pip" install --no-cache-dir --disable-pip-version-check "$src"
    (cd / && "$venv/bin/python" -c 'import sidecar, sys; sys.exit(0 if sidecar.COMPILED else "sidecar was not compiled")')
    # Smoke test: the console script starts and the bundled configs validate.
    "$venv/bin/sidecar" --version
    for cfg in "$src"/config/*.yaml; do
        "$venv/bin/sidecar" check -c "$cfg"
    done
    # config/ travels in the package: `sidecar demo` finds it from any directory
    bundled=$(cd / && "$venv/bin/python" -c 'from sidecar.cli import bundled_config_path as p; print(p())')
    case $bundled in
        "$venv"/*) "$venv/bin/sidecar" check -c "$bundled" ;;
        *) echo "the installed package has no bundled config (found: $bundled)" >&2; exit 1 ;;
    esac
}

step_runtime() {
    root=${ROOT:-}
    prefix=""
    if [ -n "$root" ]; then
        prefix="--prefix $root"
    fi
    # shellcheck disable=SC2086  # $prefix is empty or two words on purpose
    groupadd $prefix --gid "$SIDECAR_UID" sidecar
    # shellcheck disable=SC2086
    useradd $prefix --no-log-init --uid "$SIDECAR_UID" --gid "$SIDECAR_UID" \
        --no-create-home --home-dir /var/lib/sidecar --shell /usr/sbin/nologin sidecar
    # The ledger (usage_log) lives here; mount a volume on it to keep it.
    install -d -o "$SIDECAR_UID" -g "$SIDECAR_UID" -m 0750 "$root/var/lib/sidecar"
    # Config, read-only to the daemon; mount your own sidecar.yaml over it.
    install -d -o 0 -g 0 -m 0755 "$root/etc/sidecar"
}

step_ci() {
    if [ "$(id -u)" != 0 ]; then
        echo "docker-run-steps.sh ci: needs root (install -o, useradd)" >&2
        exit 1
    fi
    here=$(cd "$(dirname "$0")/.." && pwd)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    venv=${VENV:-$tmp/venv}
    echo "== build step (SRC=$here VENV=$venv)"
    # Install from a copy, as the image does, so the build never writes into the checkout.
    mkdir -p "$tmp/src"
    cp -R "$here/pyproject.toml" "$here/setup.py" "$here/README.md" "$here/sidecar" "$here/config" "$tmp/src/"
    SRC="$tmp/src" VENV="$venv" step_build
    echo "== runtime step (ROOT=$tmp/root)"
    mkdir -p "$tmp/root/etc"
    for f in passwd group shadow gshadow login.defs; do
        if [ -e "/etc/$f" ]; then cp "/etc/$f" "$tmp/root/etc/$f"; fi
    done
    # The image has no user 10001 yet; neither may the copy.
    if grep -q "^sidecar:" "$tmp/root/etc/passwd"; then
        sed -i '/^sidecar:/d' "$tmp/root/etc/passwd" "$tmp/root/etc/group" \
            "$tmp/root/etc/shadow" "$tmp/root/etc/gshadow" 2>/dev/null || true
    fi
    ROOT="$tmp/root" step_runtime
    grep -qx "sidecar:x:$SIDECAR_UID:$SIDECAR_UID::/var/lib/sidecar:/usr/sbin/nologin" \
        "$tmp/root/etc/passwd"
    grep -q "^sidecar:x:$SIDECAR_UID:" "$tmp/root/etc/group"
    [ "$(stat -c '%u:%g %a' "$tmp/root/var/lib/sidecar")" = "$SIDECAR_UID:$SIDECAR_UID 750" ]
    [ "$(stat -c '%u:%g %a' "$tmp/root/etc/sidecar")" = "0:0 755" ]
    echo "docker-run-steps.sh: build and runtime steps OK"
}

case "${1:-}" in
    build) step_build ;;
    runtime) step_runtime ;;
    ci) step_ci ;;
    *)
        echo "usage: $0 build|runtime|ci" >&2
        exit 2
        ;;
esac
