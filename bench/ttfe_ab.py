"""A/B time to first event: two builds of sidecar, interleaved, against one fake worker.

    .venv/bin/python bench/ttfe_ab.py                      # A = main, B = this working tree
    .venv/bin/python bench/ttfe_ab.py --a HEAD~1 --rounds 20 --batch 30
    .venv/bin/python bench/ttfe_ab.py --a-tree /tmp/x --b-tree /tmp/y

Starts the fake worker once (CPU 0, with this process) and two daemons pinned to CPU 1, as
bench/run.py pins a proxy: A is a git revision exported (`git archive`) to a temporary
directory, B a directory (default: this working tree); each daemon runs with its own tree
first on its path (`cwd` and PYTHONPATH). The bench's TTFE request (one-token stream,
`stream_options.include_usage`, route `auto`) is sent on one keep-alive connection per daemon,
one request at a time, `--gap-ms` (20) apart as in the bench, so each request finds the code
"cold" again; batches of `--batch` requests alternate between A and B (the order flips every
round), `--rounds` times, after `--warm` unmeasured requests each.

Prints p50 and p90 of each (pooled), B - A at p50 with a 95% bootstrap interval (resampling
each side's samples), and the per-round p50 differences (median and spread): a change is real
when the interval excludes 0 and most rounds agree. Interleaving keeps other load on the box
(tests others run, a build) from landing on one side only.

It measures and reports; it edits nothing and stops only the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from loadgen import ClientProtocol, Counters, Workload, percentile  # noqa: E402
from run import PATH_AUTO, Proc, Settings, free_port, sidecar_config, wait_port  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


def export_rev(rev: str, dest: Path) -> Path:
    """`git archive` of a revision of this repository into dest."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def start_daemon(name: str, tree: Path, s: Settings, tmp: Path, wport: int) -> tuple[Proc, int]:
    """A sidecar from `tree` (first on its path) in front of the worker, pinned as the bench pins."""
    port = free_port()
    cfg = sidecar_config(s, tmp, wport, port, 1).rename(tmp / f"{name}.yaml")
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [s.python, "-m", "sidecar", "run", "-c", str(cfg)]
    proc = Proc(name, argv, tmp / f"{name}.log", s.proxy_cpus, cwd=tree, env=env)
    if not wait_port(port, proc.popen, 15):
        tail = proc.log_tail()
        proc.stop()
        raise SystemExit(f"ttfe_ab: daemon {name} ({tree}) did not start:\n{tail}")
    return proc, port


class Client:
    """One keep-alive connection to one daemon, one request at a time."""

    def __init__(self, port: int, wl: Workload) -> None:
        self.port = port
        self.wl = wl
        self.counters = Counters()
        self.raw = wl.request_bytes(f"127.0.0.1:{port}")
        self.proto: ClientProtocol | None = None

    async def one(self) -> int | None:
        """Send one request; its time to first event (ns), None if it failed."""
        if self.proto is None or self.proto.transport is None:
            loop = asyncio.get_running_loop()
            _, self.proto = await loop.create_connection(
                lambda: ClientProtocol(self.counters, self.wl), "127.0.0.1", self.port
            )
        before = len(self.counters.ttfe_ns)
        await asyncio.wait_for(self.proto.request(self.raw), 10)
        if len(self.counters.ttfe_ns) == before:
            return None
        return self.counters.ttfe_ns[-1]


class Pacer:
    """Starts requests (to either daemon) at least `gap_s` apart, as the bench's are."""

    def __init__(self, gap_s: float) -> None:
        self.gap_s = gap_s
        self.next = time.perf_counter()

    async def wait(self) -> None:
        delay = self.next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        self.next = time.perf_counter() + self.gap_s


async def batch(client: Client, n: int, pacer: Pacer, out: list[int]) -> None:
    """n sequential requests, each started when the pacer says."""
    for _ in range(n):
        await pacer.wait()
        t = await client.one()
        if t is not None:
            out.append(t)


def bootstrap_diff(a: list[int], b: list[int], iters: int = 2000) -> tuple[float, float]:
    """95% interval of p50(b) - p50(a), resampling each side."""
    rnd = random.Random(1)
    diffs = []
    for _ in range(iters):
        ra = rnd.choices(a, k=len(a))
        rb = rnd.choices(b, k=len(b))
        diffs.append(percentile(rb, 50) - percentile(ra, 50))
    diffs.sort()
    return diffs[int(0.025 * iters)], diffs[int(0.975 * iters)]


async def measure(args: argparse.Namespace, ports: dict[str, int]) -> dict[str, list[int]]:
    """One session: warm both, then `rounds` turns alternating A and B (ABBA order)."""
    wl = Workload(path=PATH_AUTO, stream=True, tokens=1, expect_events=4)
    clients = {k: Client(p, wl) for k, p in ports.items()}
    pacer = Pacer(args.gap_ms / 1000.0)
    for c in clients.values():
        await batch(c, args.warm, pacer, [])
    samples: dict[str, list[int]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
            await batch(clients[k], args.batch, pacer, samples[k])
    for k, c in clients.items():
        if c.proto is not None and c.proto.transport is not None:
            c.proto.transport.close()
        if c.counters.errors:
            raise SystemExit(f"ttfe_ab: {k}: {c.counters.errors} failed: {c.counters.error_samples}")
    return samples


def us(ns: float) -> str:
    """ns as microseconds, for the report."""
    return f"{ns / 1e3:7.1f} us"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description="A/B time to first event, interleaved")
    ap.add_argument("--a", default="main", help="git revision for A (default: main)")
    ap.add_argument("--a-tree", type=Path, help="a directory for A instead of --a")
    ap.add_argument("--b-tree", type=Path, default=ROOT, help="directory for B (default: here)")
    ap.add_argument("--sessions", type=int, default=4, help="fresh daemons each session")
    ap.add_argument("--rounds", type=int, default=800, help="turns per session")
    ap.add_argument("--batch", type=int, default=1, help="requests per turn (1: A, B, B, A, ...)")
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--gap-ms", type=float, default=10.0, help="between two requests (A or B)")
    ap.add_argument("--nice", type=int, help="run everything at this niceness (root), as run.py")
    args = ap.parse_args(argv)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by the daemons and worker
    s = Settings(quick=True)
    os.sched_setaffinity(0, s.driver_cpus)
    runner = uvloop.run if uvloop is not None else asyncio.run
    pooled: dict[str, list[int]] = {"A": [], "B": []}
    session_diffs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ttfe-ab-") as tmpd:
        tmp = Path(tmpd)
        trees = {
            "A": (args.a_tree or export_rev(args.a, tmp / "a-tree")).resolve(),
            "B": args.b_tree.resolve(),
        }
        worker = Proc(
            "fakeworker",
            [s.python, str(BENCH / "fakeworker.py"), "--port", "0", "--tick-ms", str(s.tick_ms)],
            tmp / "fakeworker.log",
            s.driver_cpus,
        )
        try:
            line = worker.readline(10)
            if not line.startswith("READY "):
                raise SystemExit(f"ttfe_ab: fake worker did not start: {line}")
            wport = int(line.split()[1])
            for n in range(args.sessions):
                procs: dict[str, Proc] = {}
                ports: dict[str, int] = {}
                try:
                    for name in ("A", "B") if n % 2 == 0 else ("B", "A"):
                        procs[name], ports[name] = start_daemon(name, trees[name], s, tmp, wport)
                    time.sleep(0.3)
                    got = runner(measure(args, ports))
                finally:
                    for proc in procs.values():
                        proc.stop()
                a, b = got["A"], got["B"]
                session_diffs.append(percentile(b, 50) - percentile(a, 50))
                for k in got:
                    pooled[k] += got[k]
                print(
                    f"session {n + 1}: A p50 {us(percentile(a, 50))}  B p50 {us(percentile(b, 50))}"
                    f"  B-A {session_diffs[-1] / 1e3:+6.1f} us",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            worker.stop()
    a, b = pooled["A"], pooled["B"]
    lo, hi = bootstrap_diff(a, b)
    mean = statistics.fmean(session_diffs)
    sem = statistics.stdev(session_diffs) / len(session_diffs) ** 0.5 if len(session_diffs) > 1 else 0.0
    print(f"A: {args.a_tree or args.a}   B: {args.b_tree}")
    print(f"samples A {len(a)}, B {len(b)} ({args.sessions} sessions of fresh daemons)")
    print(f"A p50 {us(percentile(a, 50))}   p90 {us(percentile(a, 90))}")
    print(f"B p50 {us(percentile(b, 50))}   p90 {us(percentile(b, 90))}")
    print(
        f"B-A p50 {(percentile(b, 50) - percentile(a, 50)) / 1e3:+.1f} us "
        f"(pooled, 95% bootstrap {lo / 1e3:+.1f} .. {hi / 1e3:+.1f}); "
        f"p90 {(percentile(b, 90) - percentile(a, 90)) / 1e3:+.1f} us"
    )
    print(
        "B-A p50 per session: "
        + ", ".join(f"{d / 1e3:+.1f}" for d in session_diffs)
        + f" us; mean {mean / 1e3:+.1f} +- {sem / 1e3:.1f} us (standard error)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
