"""CPU time by service (from /proc), to see where a scenario's cycles go on a small machine.

Groups: `maof` (this process: the engine, the poller, the app, or the bench's own client
when MAOF runs in processes of its own), `localstack`, `postgres` (every backend: other
clients of the same server count too), `redis`, and whatever processes a scenario started
itself, named by the caller (`snapshot(named={pid: group})`: the API, the poller, agents),
with the processes those started (the poller's helpers).
Linux only; empty elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _group(pid: int, named: Mapping[int, str]) -> str | None:
    if pid in named:
        return named[pid]
    if pid == os.getpid():
        return "maof"
    if (parent := _parent(pid)) in named:  # a process a named one started (poller helpers)
        return named[parent]
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm == "postgres":
            return "postgres"
        if comm.startswith("redis-server"):
            return "redis"
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"localstack" in cmdline:
        return "localstack"
    return None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")": state is field 3, utime 14 and stime 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / _TICKS


def snapshot(named: Mapping[int, str] | None = None) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process of interest, by pid (`named`: pids the caller
    started, with the group each counts in)."""
    found: dict[int, tuple[str, float]] = {}
    proc = Path("/proc")
    if not proc.exists():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        group = _group(pid, named or {})
        if group is None:
            continue
        try:
            found[pid] = (group, _cpu_seconds(pid))
        except (OSError, IndexError, ValueError):
            continue
    return found


def used(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds each group used between two snapshots (processes alive at both)."""
    totals: dict[str, float] = {}
    for pid, (group, seconds) in after.items():
        if pid in before and before[pid][0] == group:
            totals[group] = totals.get(group, 0.0) + seconds - before[pid][1]
    return {group: round(totals[group], 3) for group in sorted(totals)}


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core (/proc/stat)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return (0.0, 0.0)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return ((total - idle) / _TICKS, total / _TICKS)
