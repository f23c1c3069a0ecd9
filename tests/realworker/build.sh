#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama-cpp-python sdist (which vendors
# the full llama.cpp tree) and print the path of the binary on stdout.
#
# Idempotent: the build is cached outside the repository, keyed by the pinned
# version, in ${SIDECAR_TEST_CACHE:-$HOME/.cache/sidecar-tests}/llama-server-VERSION/:
#   llama_cpp_python-VERSION.tar.gz   the sdist, checked against SHA256 below
#   src/                              the unpacked tree (make_model.py reads
#                                     vendor/llama.cpp/{gguf-py,models} from it)
#   build/                            the cmake build directory
#   bin/llama-server                  the binary (written last: its presence
#                                     means the build is complete)
# A second run prints the cached path at once. Everything but the path goes to
# stderr. About 6 minutes on 2 cores the first time.
#
# Needs: cmake, g++ (installed from Debian when missing and running as root),
# a Python with pip (PYTHON, else the repo's .venv, else python3) and access
# to PyPI for the first download only.
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
JOBS=${SIDECAR_BUILD_JOBS:-2}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE_ROOT=${SIDECAR_TEST_CACHE:-$HOME/.cache/sidecar-tests}
DIR=$CACHE_ROOT/llama-server-$VERSION
BIN=$DIR/bin/llama-server
SDIST=$DIR/llama_cpp_python-$VERSION.tar.gz
TREE=$DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp

log() { echo "build.sh: $*" >&2; }

if [[ -x $BIN && -d $TREE/gguf-py ]]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$DIR"
# One build at a time (two pytest runs, or CI and a developer).
exec 9>"$DIR/.lock"
flock 9
if [[ -x $BIN && -d $TREE/gguf-py ]]; then
    echo "$BIN"
    exit 0
fi

if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing cmake and g++ from Debian"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ make >&2
    else
        log "cmake and g++ are needed (apt-get install cmake g++)"
        exit 1
    fi
fi

sha_ok() { [[ -f $SDIST ]] && echo "$SHA256  $SDIST" | sha256sum -c --status; }

if ! sha_ok; then
    if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
    elif [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python
    else PY=python3; fi
    log "downloading llama-cpp-python==$VERSION sdist with $PY -m pip"
    tmp=$(mktemp -d "$DIR/dl.XXXXXX")
    "$PY" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$tmp" >&2
    mv "$tmp/llama_cpp_python-$VERSION.tar.gz" "$SDIST"
    rm -rf "$tmp"
    if ! sha_ok; then
        log "sha256 mismatch for $SDIST (want $SHA256, got $(sha256sum "$SDIST" | cut -d' ' -f1))"
        rm -f "$SDIST"
        exit 1
    fi
fi

if [[ ! -f $TREE/tools/server/CMakeLists.txt ]]; then
    log "unpacking $SDIST"
    rm -rf "$DIR/src"
    mkdir -p "$DIR/src.tmp"
    tar -xzf "$SDIST" -C "$DIR/src.tmp"
    mv "$DIR/src.tmp" "$DIR/src"
fi

log "configuring (cmake)"
cmake -S "$TREE" -B "$DIR/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_COMMON=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_OPENMP=OFF \
    >&2

log "building llama-server with -j$JOBS"
cmake --build "$DIR/build" --target llama-server -j "$JOBS" >&2

mkdir -p "$DIR/bin"
cp "$DIR/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
log "built $BIN"
echo "$BIN"
