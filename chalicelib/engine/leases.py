"""Claims are leases: while this process runs a stage, one background thread renews the
leases of every stage it holds (one UPDATE for all of them, every RENEW_SECONDS), so a
stage whose worker died (killed, out of time, cut off from the database) is handed on by
the sweeper within MAOF_STAGE_LEASE_SECONDS, however long its agent call may take. The
same thread renews the agent slots the process holds (selection.renew_slots): a dead
worker's slots come back within the same time.

The sweeper alone cannot tell a dead worker from a slow agent; a lease that only its
living worker renews can. In Lambda the thread is frozen with the container between
invocations, when no stage is held.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from chalicelib.agents.selection import renew_slots
from chalicelib.config import get_settings
from chalicelib.engine.stages import renew_leases
from chalicelib.logs import logger

# At most a fifth of the default lease: a process too busy to renew once or twice (a
# burst on a 2-core machine) does not lose its stages.
RENEW_SECONDS = 3.0

_held: Counter[uuid.UUID] = Counter()
_lock = threading.Lock()
_renewer: threading.Thread | None = None


@contextmanager
def held(claim_token: uuid.UUID) -> Iterator[None]:
    """Keep the stage claimed with `claim_token` leased while the block runs."""
    global _renewer
    with _lock:
        _held[claim_token] += 1
        if _renewer is None or not _renewer.is_alive():
            _renewer = threading.Thread(target=_renew_forever, name="maof-leases", daemon=True)
            _renewer.start()
    try:
        yield
    finally:
        with _lock:
            _held[claim_token] -= 1
            if _held[claim_token] <= 0:
                del _held[claim_token]


def _renew_forever() -> None:
    """Renew while this process holds stages; stop when it holds none (held() starts a new
    renewer with the next stage), so an idle process reads nothing in the background."""
    global _renewer
    interval = min(RENEW_SECONDS, get_settings().stage_lease_seconds / 3)
    while True:
        time.sleep(interval)
        with _lock:
            tokens = list(_held)
            if not tokens:
                _renewer = None
                return
        try:
            renew_leases(tokens)
        except Exception as exc:  # the database is away: the leases run out, as they should
            logger.warning("could not renew stage leases", extra={"error": type(exc).__name__})
        try:
            renew_slots()  # the agent slots this process holds for its stages, in Redis
        except Exception as exc:  # Redis errors are quiet there: anything else, say so
            logger.warning("could not renew agent slots", extra={"error": type(exc).__name__})
