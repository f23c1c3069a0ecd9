"""Tests for deploy/python.sh, which picks the interpreter every venv of the README, the
tests and the benchmark is built with: the operator's $PYTHON wins, and what it picks by
itself is a Python 3.11+ that can make a venv (shellcheck: test_docker.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "python.sh"


def pick(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPT)], capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHON"}, **env},
    )


def test_the_operators_python_wins_when_it_will_do(tmp_path: Path) -> None:
    chosen = pick().stdout.strip()
    own = tmp_path / "python3"
    own.symlink_to(chosen)
    proc = pick(PYTHON=str(own))
    assert (proc.returncode, proc.stdout) == (0, f"{own}\n")
    old = tmp_path / "python2"  # e.g. node-gyp's PYTHON: refused, not passed over
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    proc = pick(PYTHON=str(old))
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"PYTHON={old} is not a Python 3.11" in proc.stderr


def test_its_own_pick_is_a_python_that_can_make_a_venv() -> None:
    proc = pick()
    assert proc.returncode == 0, proc.stderr
    chosen = proc.stdout.strip()
    assert Path(chosen).is_absolute()
    check = subprocess.run(
        [chosen, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2] >= (3, 11))"],
        capture_output=True, text=True, timeout=60,
    )
    assert check.stdout.strip() == "True", check.stderr


def test_the_systems_python_before_the_one_on_path(tmp_path: Path) -> None:
    """PATH's python3 (here one that cannot run) is the fallback: the system's
    /usr/bin/python3 is taken first when it will do, and with neither usable the script
    says how to choose one."""
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    usr = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys, venv, ensurepip; print(sys.version_info >= (3, 11))"],
        capture_output=True, text=True, timeout=60,
    ) if Path("/usr/bin/python3").exists() else None
    proc = pick(PATH=f"{tmp_path}:/usr/bin:/bin")
    if usr is not None and usr.stdout.strip() == "True":
        assert proc.stdout == "/usr/bin/python3\n"
    else:
        assert proc.returncode == 1
        assert "set PYTHON=" in proc.stderr
