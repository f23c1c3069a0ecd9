"""Build hook: compile sidecar's hot-path modules to C extensions with mypyc.

Everything else about the package is in pyproject.toml. This file only decides whether the
modules every forwarded event goes through are compiled, and falls back to the pure-Python
package whenever they cannot be:

- ``SIDECAR_MYPYC=1``: compile, and fail the build if compiling fails;
- ``SIDECAR_MYPYC=0``: pure Python;
- unset: compile for a regular install (``pip install .``, a wheel), stay pure for an
  editable one (``pip install -e .``, so an edit to a .py file takes effect at once), and
  fall back to pure Python if compiling fails (no C compiler, say).

The compiled and the pure package behave the same; the test suite runs on both
(``tests/run.sh``). ``python -c 'import sidecar; print(sidecar.COMPILED)'`` tells which one
is installed.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from setuptools import setup

#: The modules a request or a stream passes through. Not compiled: start-up and admin code
#: (cli, config, demo, systemd, admin, no_tls), packages' __init__ (a compiled package
#: __init__ cannot import its pure submodules) and dialects/merge.py (mypyc code raises no
#: RecursionError, and merge recurses into whatever nesting a worker sends).
HOT_MODULES = [
    "sidecar/chunked.py",
    "sidecar/daemon.py",
    "sidecar/deadlines.py",
    "sidecar/exchange.py",
    "sidecar/failures.py",
    "sidecar/fastlane.py",
    "sidecar/framing.py",
    "sidecar/handlers.py",
    "sidecar/headers.py",
    "sidecar/ledger.py",
    "sidecar/logs.py",  # the access-log line of every request (log_access, utc_timestamp)
    "sidecar/metrics.py",
    "sidecar/pump.py",
    "sidecar/routes.py",
    "sidecar/runtime.py",
    "sidecar/server.py",
    "sidecar/sse.py",
    "sidecar/upstream.py",
    "sidecar/usage.py",
    "sidecar/dialects/anthropic.py",
    "sidecar/dialects/base.py",
    "sidecar/dialects/jsonio.py",
    "sidecar/dialects/openai.py",
    "sidecar/dialects/openai_responses.py",
    "sidecar/dialects/passthrough.py",
    "sidecar/dialects/typed.py",
]


def _editable_build() -> bool:
    return any(arg in ("editable_wheel", "develop") for arg in sys.argv[1:])


def _compiled_extensions(required: bool) -> list[Any]:
    """mypyc's extension modules for HOT_MODULES, or [] (pure Python) when not `required` and
    mypyc is missing or rejects the code."""
    try:
        from mypyc.build import mypycify

        # multi_file: a C file per module, not one for all, so that the build compiles them
        # side by side (_compile_in_parallel); the compiled code runs as fast (README)
        return list(mypycify(HOT_MODULES, opt_level="3", debug_level="0", multi_file=True))
    except (Exception, SystemExit) as failure:
        if required:
            raise
        print(f"sidecar: building pure Python ({failure!r})", file=sys.stderr)
        return []


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _compile_in_parallel(compiler: Any, jobs: int) -> None:
    """Make `compiler` compile an extension's C files `jobs` at a time, biggest first, each by
    its own compile() (which compiles them one after the other). The first failure stops the
    files not yet started and is raised."""
    compile_serially = compiler.compile

    def compile_sources(sources: list[str], *args: Any, **kwargs: Any) -> list[str]:
        if jobs < 2 or len(sources) < 2:
            return list(compile_serially(sources, *args, **kwargs))
        with ThreadPoolExecutor(jobs) as pool:
            futures = {
                source: pool.submit(compile_serially, [source], *args, **kwargs)
                for source in sorted(sources, key=os.path.getsize, reverse=True)
            }
            done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
            for future in futures.values():
                future.cancel()
        for future in done:
            future.result()  # raises a failure
        return [obj for source in sources for obj in futures[source].result()]

    compiler.compile = compile_sources


def _build_ext_falling_back(required: bool) -> type:
    """A build_ext that, when not `required`, removes what it built and goes on in pure Python
    if the C compiler fails."""
    from setuptools.command.build_ext import build_ext

    class BuildExt(build_ext):  # type: ignore[misc,valid-type]
        def build_extensions(self) -> None:
            # as many at a time as `build_ext -j N` says, else as this process has CPUs
            jobs = self.parallel if self.parallel and self.parallel is not True else None
            _compile_in_parallel(self.compiler, jobs or _usable_cpus())
            super().build_extensions()

        def run(self) -> None:
            try:
                super().run()
            except Exception as failure:
                if required:
                    raise
                print(f"sidecar: C build failed, pure Python instead ({failure!r})", file=sys.stderr)
                for extension in self.extensions:
                    built = self.get_ext_fullpath(extension.name)
                    if os.path.exists(built):
                        os.remove(built)
                self.extensions = []
                self.distribution.ext_modules = []

    return BuildExt


def main() -> None:
    choice = os.environ.get("SIDECAR_MYPYC", "").strip()
    if choice not in ("", "0", "1"):
        sys.exit(f"SIDECAR_MYPYC must be 0, 1 or unset, not {choice!r}")
    compile_modules = choice == "1" or (choice == "" and not _editable_build())
    if not compile_modules:
        setup()
        return
    required = choice == "1"
    extensions = _compiled_extensions(required)
    if not extensions:
        setup()
        return
    setup(ext_modules=extensions, cmdclass={"build_ext": _build_ext_falling_back(required)})


main()
