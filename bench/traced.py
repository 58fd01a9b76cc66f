"""`python -m bench.traced OUT -- python-module [args]`: run a module (the poller) with the
engine's probes recorded (chalicelib/engine/trace.py), written to OUT as JSON lines
`[point, run_id, stage_id, unix_time]` when the module returns (the poller does on SIGTERM
or Ctrl-C, once its receives are back).

For `--capacity-trace`: where each stage's time goes when the poller runs in a process
of its own. The hook costs a little per probe, so the traced drain is a diagnosis, not
the headline figure.
"""

from __future__ import annotations

import json
import runpy
import sys
import threading
import time
import uuid

_points: list[tuple[str, str, str, float]] = []
_lock = threading.Lock()


def _record(point: str, run_id: uuid.UUID, stage_id: str) -> None:
    now = time.time()
    with _lock:
        _points.append((point, str(run_id), stage_id, now))


def _dump(path: str) -> None:
    with _lock:
        lines = [json.dumps(p) for p in _points]
    with open(path, "w") as out:
        out.write("\n".join(lines) + ("\n" if lines else ""))


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print("usage: python -m bench.traced OUT -- module [args]", file=sys.stderr)
        return 2
    out, module, args = sys.argv[1], sys.argv[3], sys.argv[4:]
    from chalicelib.engine import trace

    trace.set_hook(_record)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__")
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        _dump(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
