"""Process accounting for the benchmark: CPU time and RSS of a process tree, read from /proc.

CPU is the sum of the first field of /proc/PID/task/TID/schedstat (nanoseconds on CPU) over every
thread of every process in the tree, so a proxy's master, workers and helper threads all count.
This module only reads /proc; it never starts, signals or waits for a process.
"""

from __future__ import annotations

import os


def _ppid_map() -> dict[int, int]:
    """Map every visible pid to its parent pid."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: the fields after the last ')' are fixed.
        rest = stat[stat.rfind(b")") + 2 :].split()
        out[int(name)] = int(rest[1])
    return out


def tree_pids(root: int) -> list[int]:
    """Return root and all its live descendants."""
    ppids = _ppid_map()
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in ppids or pid == root:
            out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_ns(pids: list[int]) -> int:
    """Sum of on-CPU nanoseconds of every thread of the given processes (exited threads are lost)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def tree_cpu_ns(root: int) -> int:
    """On-CPU nanoseconds of root's whole process tree, all threads."""
    return cpu_ns(tree_pids(root))


def rss_bytes(pids: list[int]) -> int:
    """Sum of VmRSS over the given processes, in bytes."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over root's whole process tree, in bytes."""
    return rss_bytes(tree_pids(root))
