"""CPU time by service (from /proc), to see where a scenario's cycles go on a small machine.

Groups: `maof` (this process: the engine, the poller, the app), `localstack`, `postgres`
(every backend: other clients of the same server count too), `redis`. Linux only; empty
elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _group(pid: int) -> str | None:
    if pid == os.getpid():
        return "maof"
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


def snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process of interest, by pid."""
    found: dict[int, tuple[str, float]] = {}
    proc = Path("/proc")
    if not proc.exists():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        group = _group(pid)
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
