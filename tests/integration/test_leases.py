"""Lease renewals never wait on a stage row another transaction holds (a completion,
mostly): they renew the others and take the held one at the next renewal."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import text

from chalicelib.db import session_scope
from chalicelib.engine import stages
from tests.integration.conftest import register_agent, unique_capability
from tests.integration.test_delivery import chain, submit_direct


def _lease_of(claimed: stages.ClaimedStage) -> Any:
    with session_scope() as session:
        return session.execute(
            text("SELECT lease_expires_at FROM stage_executions WHERE id = :id"),
            {"id": claimed.id},
        ).scalar_one()


def test_a_renewal_skips_a_stage_row_held_by_another_transaction(user: Any, sent: Any) -> None:
    capability = unique_capability("renew")
    register_agent(user, capability)
    first, second = (
        stages.claim_stage(submit_direct(user, chain(capability, "a")), "a") for _ in range(2)
    )
    assert first is not None and second is not None
    before = _lease_of(second)
    renewed: list[int] = []
    with session_scope() as holder:  # a completion of the first stage, in flight
        holder.execute(
            text("SELECT id FROM stage_executions WHERE id = :id FOR UPDATE"), {"id": first.id}
        )
        renewal = threading.Thread(
            target=lambda: renewed.append(
                stages.renew_leases([first.claim_token, second.claim_token])
            )
        )
        renewal.start()
        renewal.join(timeout=10)
        assert not renewal.is_alive(), "the renewal waited on the held row"
    assert renewed == [1]
    assert _lease_of(second) > before
    assert stages.renew_leases([first.claim_token, second.claim_token]) == 2
