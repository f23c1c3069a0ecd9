"""Profile the sidecar's hot path with py-spy under one bench load and print the top functions.

Starts the fake worker and sidecar exactly as bench/run.py does (pinned to their cores), drives
one phase of the benchmark (paced streams by default), samples the daemon with
`py-spy record --format raw --nonblocking` and prints the functions with the most samples, by
self time and inclusive. Needs py-spy (`pip install py-spy`) and ptrace permission.

A measuring tool: it never edits the project and only stops the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402
from loadgen import LoadGen, Workload  # noqa: E402

PHASES = {
    "stream": (run.PATH_AUTO, True, True),
    "json": (run.PATH_AUTO, False, False),
    "json_sse": (run.PATH_NEVER, True, False),
    "sse_json": (run.PATH_ALWAYS, False, True),
    "sat": (run.PATH_SAT, True, False),
}
_LINE = re.compile(r":\d+\)$")
_LOOP_LEAVES = ("Runner.run (", "run (uvloop/", "run_forever (", "_run_once (")


def summarize(raw: str, top: int) -> str:
    """Top functions by self and inclusive samples from py-spy's raw (collapsed) output."""
    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    total = loop = py_total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        # drop the process/thread header frames py-spy adds
        frames = [f for f in frames if " (" in f]
        if not frames:
            continue
        if frames[-1].startswith(_LOOP_LEAVES):
            loop += n
            continue
        py_total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    out = [
        f"{total} samples; {loop} in the event loop's own C code or runnable but waiting for a "
        f"CPU (leaf frame is the loop runner), {py_total} in Python callbacks; percentages "
        "below are of the latter"
    ]
    # the frames every callback runs under (cli, daemon, loop runner) say nothing
    incl_c = collections.Counter({f: n for f, n in incl_c.items() if n < 0.85 * py_total})
    for title, counter in (("self", self_c), ("inclusive", incl_c)):
        out.append(f"top {top} by {title}:")
        for f, n in counter.most_common(top):
            out.append(f"  {100 * n / max(py_total, 1):5.1f}%  {f}")
    return "\n".join(out)


async def drive(args: argparse.Namespace, s: run.Settings, tmp: Path) -> str:
    """Start worker and sidecar, run the load, sample, stop everything."""
    worker = run.Proc(
        "fakeworker",
        [
            s.python,
            str(BENCH / "fakeworker.py"),
            "--port",
            "0",
            "--tick-ms",
            str(s.tick_ms),
            "--sat-batch",
            str(s.sat_batch),
        ],
        tmp / "fakeworker.log",
        s.driver_cpus,
    )
    line = worker.readline(10)
    if not line.startswith("READY "):
        raise SystemExit(f"fake worker did not start: {worker.log_tail()}")
    wport = int(line.split()[1])
    proxy, port, why = run.start_sidecar(s, tmp, wport)
    if proxy is None:
        worker.stop()
        raise SystemExit(why)
    path, stream, paced = PHASES[args.phase]
    wl = Workload(path=path, stream=stream, tokens=s.tokens)
    gen = LoadGen("127.0.0.1", port, wl, s.streams, stagger_s=s.period_s if paced else 0.0)
    out_file = tmp / "pyspy.txt"
    try:
        gen.start()
        await asyncio.sleep(s.period_s + 0.3 if paced else 0.5)
        spy = await asyncio.create_subprocess_exec(
            args.py_spy,
            "record",
            "--format",
            "raw",
            "--nonblocking",
            "--subprocesses",
            "--rate",
            str(args.rate),
            "--duration",
            str(int(args.seconds)),
            "-o",
            str(out_file),
            "--pid",
            str(proxy.pid),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await spy.communicate()
        await gen.abort()
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        c = gen.counters
        head = f"phase {args.phase}: {c.events} events, {c.responses} responses, {c.errors} errors"
        return head + "\n" + summarize(out_file.read_text(), args.top)
    finally:
        proxy.stop()
        worker.stop()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=sorted(PHASES), default="stream")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument(
        "--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    )
    args = ap.parse_args(argv)
    if not os.access(args.py_spy, os.X_OK):
        raise SystemExit("py-spy not found: pip install py-spy")
    s = run.Settings(quick=False)
    s.streams = args.streams
    s.tokens = args.tokens
    os.sched_setaffinity(0, s.driver_cpus)
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-profile-"))
    try:
        runner = run.uvloop.run if run.uvloop is not None else asyncio.run
        print(runner(drive(args, s, tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
