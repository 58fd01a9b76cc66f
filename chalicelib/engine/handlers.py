"""Entry points the Lambda handlers call: a batch of stage messages, and the sweeper."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from chalicelib.agents.mock import AgentCallFailed, call_mock_agent
from chalicelib.agents.selection import NoAgentAvailable, in_flight, select_agent
from chalicelib.engine import stages, sweeper
from chalicelib.engine.queue import StageMessage, send_stage_messages
from chalicelib.logs import logger
from chalicelib.workflows.references import UnresolvableReference, resolve

# Fixed at import because Chalice binds the SQS trigger when the app is loaded.
STAGE_QUEUE_NAME = os.environ.get("MAOF_STAGE_QUEUE_NAME", "maof-stage-queue")


def run_stage(run_id: uuid.UUID, stage_id: str) -> str:
    """Run one stage end to end; returns what happened (for logs and tests)."""
    claimed = stages.claim_stage(run_id, stage_id)
    if claimed is None:
        return "not-queued"
    try:
        return _execute(claimed)
    except Exception:
        stages.release_stage(claimed)
        raise


def _execute(claimed: stages.ClaimedStage) -> str:
    run_id = claimed.run_id
    context = stages.load_context(claimed)
    try:
        if claimed.input_template is None:
            stage_input = stages.default_input(claimed, context)
        else:
            stage_input = resolve(claimed.input_template, context.workflow_input, context.outputs)
    except UnresolvableReference as exc:
        stages.fail_stage(claimed, str(exc))
        return "failed"
    try:
        agent = select_agent(claimed.capability)
    except NoAgentAvailable as exc:
        stages.fail_stage(claimed, str(exc), stage_input=stage_input)
        return "failed"
    try:
        with in_flight(agent):
            output = call_mock_agent(agent.agent_id, claimed.capability, stage_input)
    except AgentCallFailed as exc:
        stages.fail_stage(
            claimed, f"agent '{agent.agent_id}' failed: {exc}", agent.agent_id, stage_input
        )
        return "failed"
    ready = stages.complete_stage(claimed, agent.agent_uuid, agent.agent_id, stage_input, output)
    if ready:
        send_stage_messages(run_id, ready)
    return "completed"


def run_stage_batch(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Run every stage message of a batch; report the ones to redeliver."""
    failures = []
    for record in records:
        try:
            message = StageMessage.parse(record["body"])
        except (ValueError, KeyError, json.JSONDecodeError):
            # Not ours and never will be: drop it rather than redeliver it forever.
            logger.error(
                "dropping malformed stage message", extra={"messageId": record.get("messageId")}
            )
            continue
        try:
            outcome = run_stage(message.run_id, message.stage_id)
            logger.debug(
                "stage message handled",
                extra={
                    "runId": str(message.run_id),
                    "stageId": message.stage_id,
                    "outcome": outcome,
                },
            )
        except Exception:
            logger.exception(
                "stage message failed; it will be redelivered",
                extra={"runId": str(message.run_id), "stageId": message.stage_id},
            )
            failures.append({"itemIdentifier": record["messageId"]})
    return {"batchItemFailures": failures}


def sweep_stalled_stages() -> dict[str, Any]:
    """Re-queue stages whose message was lost or whose worker died."""
    return sweeper.sweep()
