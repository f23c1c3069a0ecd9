"""The command line: `sidecar run | check | demo`, `sidecar --version`.

Parses arguments and turns startup problems into one-line messages and exit
codes (2 for a bad config, 1 for anything else that stops startup).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from sidecar import __version__

DEFAULT_CONFIG = "config/sidecar.yaml"


def bundled_config_path() -> str:
    """The bundled config/sidecar.yaml: beside the source tree in a checkout (or an editable
    install), else the copy installed with the package (`sidecar.bundled`)."""
    beside = Path(__file__).resolve().parent.parent / DEFAULT_CONFIG
    if beside.exists():
        return str(beside)
    from importlib.resources import files

    with contextlib.suppress(ModuleNotFoundError):
        installed = files("sidecar.bundled") / "sidecar.yaml"
        if installed.is_file():
            return str(installed)
    return DEFAULT_CONFIG


def default_config_path() -> str:
    """`$SIDECAR_CONFIG`, else config/sidecar.yaml here, else the bundled one."""
    env = os.environ.get("SIDECAR_CONFIG")
    if env:
        return env
    if Path(DEFAULT_CONFIG).exists():
        return DEFAULT_CONFIG
    return bundled_config_path()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A daemon beside an LLM worker that makes its HTTP streams correct.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument(
        "-c",
        "--config",
        help="config file (default: $SIDECAR_CONFIG, then config/sidecar.yaml here, then the bundled one)",
    )
    check = commands.add_parser("check", help="validate a config file; exit 0 or 2")
    check.add_argument("-c", "--config", help="config file (default as for run)")
    demo = commands.add_parser("demo", help="run a demo worker and the daemon in front of it")
    demo.add_argument(
        "-c", "--config", help="config file (default: the bundled config/sidecar.yaml)"
    )
    return parser


#: Signals that stop the daemon. Until its own handlers are in place (the listener is bound
#: before that, so a supervisor may already stop it) they are held, not lost: SIGTERM's
#: default action would kill the process (not SPEC's clean exit 0) and Ctrl-C would raise
#: wherever the imports are. The daemon releases them (`daemon.release_stop_signals`).
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def main(argv: list[str] | None = None) -> int:
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    # A SIGHUP before the daemon's own handler is in place (logrotate's postrotate racing a
    # restart) would kill it: until then there is no running config to reload anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = _parser().parse_args(argv)
    if args.command not in ("run", "demo"):
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    if args.command is None:
        _parser().print_help(sys.stderr)
        return 2
    if args.config == "":
        print(f"sidecar {args.command}: -c/--config needs a file path", file=sys.stderr)
        return 2
    if args.config is not None:
        path = args.config
    elif args.command == "demo":  # the demo fronts its own worker: never $SIDECAR_CONFIG's
        path = bundled_config_path()
    else:
        path = default_config_path()
    if args.command == "check":
        return check(path)
    from sidecar import no_tls

    no_tls.install()  # before asyncio: the daemon never loads OpenSSL
    from sidecar.daemon import StartupError

    try:
        if args.command == "demo":
            from sidecar.demo import run_demo

            return run_demo(path)
        return run(path)
    except StartupError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def check(path: str) -> int:
    from sidecar.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 2
    print(f"{path}: ok ({len(config.routes)} routes, worker {config.upstream.url})")
    return 0


def _print_problems(problems: list[str]) -> None:
    """check's findings are its output (stdout) and its diagnostics (stderr): written to
    both, once when both streams go to the same place (a terminal, `2>&1`), so a script
    that reads either one sees every problem and a person sees each once."""
    text = "".join(f"{problem}\n" for problem in problems)
    sys.stdout.write(text)
    sys.stdout.flush()
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
        same = (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)
    except (OSError, ValueError, AttributeError):  # not real files (captured in process)
        same = False
    if not same:
        sys.stderr.write(text)


def run(path: str) -> int:
    from sidecar.daemon import load_or_exit, run_daemon
    from sidecar.logs import setup_logging
    from sidecar.runtime import tune_gc

    config = load_or_exit(path)
    setup_logging(config.log_format, config.log_level)
    tune_gc()
    return run_daemon(config)
