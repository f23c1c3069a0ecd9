"""Optional mypyc build of sidecar's hot modules (FEASIBILITY SPIKE, helper-76; not merged).

pyproject.toml holds the package's metadata; this file only adds the compiled extensions.
`pip install .` compiles the modules in COMPILED with mypyc into one shared library
(sidecar/_native__mypyc*.so) plus a small shim .so per module, each shim sitting beside its
.py file and imported ahead of it (CPython's import system tries extension modules before
source). When it cannot compile (mypy not in the build environment, no C compiler, no
Python.h, a compile error), it says so on stderr and installs the pure-Python package,
which behaves the same, only slower.

    SIDECAR_MYPYC=0   never compile (pure Python)
    SIDECAR_MYPYC=1   compile, and fail the install when compiling fails
    unset             compile for a wheel / `pip install .`, fall back to pure on failure;
                      editable installs (`pip install -e .`) stay pure: a compiled module
                      would shadow later edits to its .py file

The compiled modules check argument and attribute types at run time (mypyc), so the test
suite must pass against both builds.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The sans-I/O core, then the I/O shell on the hot path. Not compiled: cli, config, daemon,
# runtime, admin, systemd, failures, demo*, no_tls (start-up and admin paths).
COMPILED = [
    "sidecar/fastlane.py",
    "sidecar/chunked.py",
    "sidecar/sse.py",
    "sidecar/framing.py",
    "sidecar/headers.py",
    "sidecar/routes.py",
    "sidecar/usage.py",
    "sidecar/dialects/__init__.py",
    "sidecar/dialects/anthropic.py",
    "sidecar/dialects/base.py",
    "sidecar/dialects/jsonio.py",
    "sidecar/dialects/openai.py",
    "sidecar/dialects/openai_responses.py",
    "sidecar/dialects/passthrough.py",
    "sidecar/dialects/typed.py",
    "sidecar/upstream.py",
    "sidecar/pump.py",
    "sidecar/handlers.py",
    "sidecar/exchange.py",
    "sidecar/server.py",
    "sidecar/deadlines.py",
    "sidecar/metrics.py",
    "sidecar/logs.py",
    "sidecar/ledger.py",
]


def _say(message: str) -> None:
    print(f"sidecar setup.py: {message}", file=sys.stderr)


def _can_compile_c() -> bool:
    """A C compiler that finds Python.h: what building any extension needs."""
    from setuptools._distutils import ccompiler
    from setuptools._distutils import sysconfig as dsysconfig

    compiler = ccompiler.new_compiler()
    dsysconfig.customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <Python.h>\nint probe(void) { return PY_MAJOR_VERSION; }\n")
        try:
            compiler.compile([src], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]])
        except Exception as exc:  # CompileError, or the compiler binary missing (OSError)
            _say(f"no working C compiler with Python.h ({exc.__class__.__name__}: {exc})")
            return False
    return True


class OptionalBuildExt(build_ext):
    """build_ext that, unless SIDECAR_MYPYC=1, leaves the package pure when a build fails.

    All or nothing: a shim without its shared library would make `import sidecar.x` fail
    instead of falling back to x.py, so every output built so far is removed on failure."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if os.environ.get("SIDECAR_MYPYC") == "1":
                raise
            _say(f"compiling failed, installing pure Python ({exc.__class__.__name__}: {exc})")
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []


def _ext_modules() -> list:
    wanted = os.environ.get("SIDECAR_MYPYC", "")
    if wanted == "0":
        return []
    editable = "editable_wheel" in sys.argv or "develop" in sys.argv
    if editable and wanted != "1":
        _say("editable install: pure Python (SIDECAR_MYPYC=1 to compile in place)")
        return []
    if sys.implementation.name != "cpython":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if wanted == "1":
            raise
        _say("mypyc is not installed in the build environment: pure Python")
        return []
    if not _can_compile_c():
        if wanted == "1":
            raise SystemExit("SIDECAR_MYPYC=1 but there is no working C compiler")
        return []
    try:
        extensions = mypycify(COMPILED, group_name="sidecar._native", opt_level="3")
    except BaseException as exc:  # mypyc reports type errors by SystemExit
        if wanted == "1":
            raise
        _say(f"mypyc failed, installing pure Python ({exc.__class__.__name__}: {exc})")
        return []
    return extensions


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
