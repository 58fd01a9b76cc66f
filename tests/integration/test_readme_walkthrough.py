"""The seed README's curl walkthrough, step by step, with the documented shapes."""

from __future__ import annotations

import uuid

from examples.agents import server as example_agent
from examples.agents.protocol import serve
from tests.integration.conftest import Api, free_port, unique_email, wait_for_run


def test_seed_walkthrough_register_login_agent_workflow_status_result_audit(api: Api, poller):
    # The example agent, as `make dev` runs it (here on a free port, not 9001).
    port = free_port()
    agent_server = serve(example_agent.agent, "127.0.0.1", port, "/agent", "agent-secret-key")
    email = unique_email()
    # 1. Create an account
    created = api.post(
        "/auth/register", {"email": email, "password": "yourpassword", "name": "Your Name"}
    )
    assert created.status_code == 201
    assert set(created.json()["data"]) == {"userUuid", "email", "name", "role", "createdAt"}
    # 2. Login
    login = api.post("/auth/login", {"email": email, "password": "yourpassword"})
    assert login.status_code == 200
    tokens = login.json()["data"]
    assert set(tokens) == {"accessToken", "refreshToken", "user"}
    me = Api(api.base_url, token=tokens["accessToken"])
    # 3. Register an AI agent (agentId made unique: the test database is shared)
    agent = me.post(
        "/agents/register",
        {
            "agentId": f"my-summarizer-{uuid.uuid4().hex[:6]}",
            "name": "Text Summarizer",
            "endpoint": f"http://127.0.0.1:{port}/agent",
            "authToken": "agent-secret-key",
            "capabilities": ["summarization", "text-generation"],
        },
    )
    assert agent.status_code == 201
    assert agent.json()["data"]["status"] == "online"  # checked at once
    assert "agent-secret-key" not in agent.text
    # 4. Submit a workflow
    submitted = me.post(
        "/workflows/execute",
        {
            "workflow": {
                "name": "my-first-pipeline",
                "stages": [
                    {
                        "id": "step-1",
                        "name": "Extract Key Points",
                        "agentCapability": "text-generation",
                    },
                    {
                        "id": "step-2",
                        "name": "Summarize Results",
                        "agentCapability": "summarization",
                        "dependencies": ["step-1"],
                    },
                ],
            },
            "input": {"text": "Your input text goes here..."},
        },
    )
    assert submitted.status_code == 202
    run_id = submitted.json()["data"]["workflowRunId"]
    # 5. Check workflow status
    run = wait_for_run(me, run_id)
    assert run["status"] == "completed"
    assert {
        "workflowRunId",
        "workflowName",
        "status",
        "progress",
        "stages",
        "createdAt",
        "startedAt",
        "completedAt",
        "errorMessage",
    } <= set(run)
    assert run["progress"]["total"] == 2 and run["progress"]["completed"] == 2
    # 6. Get the result
    result = me.get(f"/workflows/{run_id}/result").json()["data"]
    assert result["workflowRunId"] == run_id
    assert result["output"]["summary"] == "Your input text goes here"
    assert result["output"]["wordCount"] == 5
    # 7. View the audit trail
    audit = me.get(f"/workflows/{run_id}/audit").json()["data"]
    assert audit["workflowRunId"] == run_id
    assert audit["chain"]["valid"] is True
    assert [entry["stageId"] for entry in audit["logs"] if entry["action"] == "execute"] == [
        "step-1",
        "step-2",
    ]
    agent_server.shutdown()
