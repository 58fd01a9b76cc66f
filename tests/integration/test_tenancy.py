"""Agents belong to their owner: another user's run never reaches a private agent, shared
agents (an admin's choice) serve everyone without showing their endpoint or owner, every
agent route answers 404 across tenants, and once a delete or an unsharing returns, the
agent gets no new stage, whatever the capability cache holds."""

from __future__ import annotations

import uuid
from typing import Any

from chalicelib import cache
from chalicelib.agents.candidates import (
    candidates_uncached,
    capability_cache_key,
    capability_generation_key,
)
from chalicelib.agents.selection import eligible
from chalicelib.engine import sweeper
from tests.integration.conftest import (
    Api,
    name_admins,
    register_agent,
    unique_capability,
    unique_email,
    wait_for_run,
)
from tests.support.agents import ScriptedAgent, start_agent


def run(client: Api, capability: str, secret: str = "tenant data") -> dict[str, Any]:
    response = client.post(
        "/workflows/execute",
        {
            "workflow": {
                "name": "tenancy",
                "stages": [{"id": "a", "name": "A", "agentCapability": capability}],
            },
            "input": {"secret": secret},
        },
    )
    assert response.status_code == 202, response.text
    return wait_for_run(client, response.json()["data"]["workflowRunId"])


def test_another_users_run_never_reaches_a_private_agent(
    user: Api, api: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    agent = start_agent(agents)
    capability = unique_capability("private")
    register_agent(user, capability, endpoint=agent.url)
    other = api.as_new_user()
    result = run(other, capability, secret="B's data")
    assert result["status"] == "failed", result
    assert f"No available agent has the capability '{capability}'" in result["errorMessage"]
    assert agent.calls == [], "A's agent received nothing of B's"
    # The control: A's own run does reach it.
    assert run(user, capability)["status"] == "completed"
    assert len(agent.calls) == 1


def test_a_shared_agent_serves_every_user(
    admin: Api, api: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    agent = start_agent(agents)
    capability = unique_capability("shared")
    register_agent(admin, capability, endpoint=agent.url, visibility="shared")
    other = api.as_new_user()
    result = run(other, capability, secret="B's data")
    assert result["status"] == "completed", result
    assert agent.calls[0].body["input"] == {"secret": "B's data"}


def test_a_users_own_agents_and_shared_ones_both_serve_the_users_runs(
    admin: Api, user: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    mine, shared = start_agent(agents), start_agent(agents)
    capability = unique_capability("both")
    register_agent(user, capability, endpoint=mine.url)
    register_agent(admin, capability, endpoint=shared.url, visibility="shared")
    assert user.user is not None
    serving = {a["endpoint"] for a in eligible(capability, uuid.UUID(user.user["userUuid"]))}
    assert serving == {mine.url, shared.url}
    for _ in range(3):
        assert run(user, capability)["status"] == "completed"
    assert len(mine.calls) + len(shared.calls) == 3


def test_only_an_admin_may_share_an_agent(user: Api, admin: Api) -> None:
    capability = unique_capability()
    response = user.post(
        "/agents/register",
        {
            "agentId": f"share-{capability}",
            "name": "S",
            "endpoint": "mock://s",
            "authToken": "t",
            "capabilities": [capability],
            "visibility": "shared",
        },
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["details"][0]["field"] == "visibility"
    mine = register_agent(user, capability)
    assert mine["visibility"] == "private", "private by default"
    refused = user.request("PATCH", f"/agents/{mine['agentUuid']}", json={"visibility": "shared"})
    assert refused.status_code == 403
    own = register_agent(admin, capability)
    shared = admin.request("PATCH", f"/agents/{own['agentUuid']}", json={"visibility": "shared"})
    assert shared.status_code == 200, shared.text
    assert shared.json()["data"]["visibility"] == "shared"


def test_admins_are_named_by_account_not_by_an_email_anyone_may_register(
    api: Api, admin: Api
) -> None:
    """Admins were named by email, and no email is verified: whoever registered an email
    before its owner (or before the operator listed it) became an admin at sign-in, able to
    share an agent and so receive every user's stages. Now the operator names the account."""
    claimed = api.post(
        "/auth/register", {"email": unique_email(), "password": "p" * 12, "name": "Claimer"}
    )
    assert claimed.status_code == 201 and claimed.json()["data"]["role"] == "user"
    email = claimed.json()["data"]["email"]
    signed_in = api.post("/auth/login", {"email": email, "password": "p" * 12}).json()["data"]
    assert signed_in["user"]["role"] == "user"
    user_uuid = signed_in["user"]["userUuid"]
    claimer = Api(api.base_url, token=signed_in["accessToken"])
    agent = register_agent(claimer, unique_capability())
    path = f"/agents/{agent['agentUuid']}"
    share = {"visibility": "shared"}
    assert claimer.request("PATCH", path, json=share).status_code == 403
    # Named by the operator, the account may share at once, and is shown as an admin at
    # its next sign-in; named no more, it may not.
    name_admins(admin.user["userUuid"], user_uuid)
    assert claimer.request("PATCH", path, json=share).status_code == 200
    again = api.post("/auth/login", {"email": email, "password": "p" * 12}).json()["data"]
    assert again["user"]["role"] == "admin"
    name_admins(admin.user["userUuid"])
    assert claimer.request("PATCH", path, json={"visibility": "private"}).status_code == 200
    assert claimer.request("PATCH", path, json=share).status_code == 403


def test_visibility_must_be_private_or_shared(user: Api) -> None:
    agent = register_agent(user, unique_capability())
    response = user.request("PATCH", f"/agents/{agent['agentUuid']}", json={"visibility": "public"})
    assert response.status_code == 400
    assert response.json()["error"]["details"][0]["field"] == "visibility"


def test_every_agent_route_answers_404_for_another_users_private_agent(user: Api, api: Api) -> None:
    capability = unique_capability("hidden")
    agent = register_agent(user, capability)
    path = f"/agents/{agent['agentUuid']}"
    other = api.as_new_user()
    answers = {
        "get": other.get(path),
        "patch": other.request("PATCH", path, json={"visibility": "private"}),
        "health-check": other.post(f"{path}/health-check"),
        "delete": other.delete(path),
    }
    for route, response in answers.items():
        assert response.status_code == 404, (route, response.text)
        assert response.json()["error"]["message"] == "Agent not found"
    listed = other.get("/agents", params={"capability": capability}).json()["data"]
    assert listed["agents"] == [] and listed["meta"]["total"] == 0
    assert user.get(path).status_code == 200, "the owner still has it"


def test_shared_agents_are_listed_to_everyone_without_endpoint_or_owner(
    admin: Api, api: Api
) -> None:
    capability = unique_capability("listed")
    agent = register_agent(admin, capability, visibility="shared")
    assert agent["endpoint"] and agent["ownerUserUuid"], "the owner sees everything"
    other = api.as_new_user()
    seen = other.get("/agents", params={"capability": capability}).json()["data"]["agents"]
    assert [a["agentUuid"] for a in seen] == [agent["agentUuid"]]
    for view in (seen[0], other.get(f"/agents/{agent['agentUuid']}").json()["data"]):
        assert "endpoint" not in view and "ownerUserUuid" not in view
        assert "authToken" not in view
        assert view["visibility"] == "shared"
    # Others may see a shared agent but not probe, change or delete it.
    path = f"/agents/{agent['agentUuid']}"
    assert other.post(f"{path}/health-check").status_code == 403
    assert other.request("PATCH", path, json={"visibility": "private"}).status_code == 403
    assert other.delete(path).status_code == 403


def test_unsharing_stops_routing_to_other_users_at_once(
    admin: Api, api: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    agent = start_agent(agents)
    capability = unique_capability("unshare")
    shared = register_agent(admin, capability, endpoint=agent.url, visibility="shared")
    other = api.as_new_user()
    assert run(other, capability)["status"] == "completed"
    calls = len(agent.calls)
    made_private = admin.request(
        "PATCH", f"/agents/{shared['agentUuid']}", json={"visibility": "private"}
    )
    assert made_private.status_code == 200
    assert run(other, capability)["status"] == "failed"
    assert len(agent.calls) == calls


def test_an_account_no_longer_named_admin_keeps_no_shared_agent(
    admin: Api, api: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    """Its shared agents kept receiving every user's stages, and no one but their owner
    could unshare them; now the sweeper makes them private."""
    agent = start_agent(agents)
    capability = unique_capability("demoted")
    shared = register_agent(admin, capability, endpoint=agent.url, visibility="shared")
    path = f"/agents/{shared['agentUuid']}"
    other = api.as_new_user()
    assert run(other, capability)["status"] == "completed"
    calls = len(agent.calls)
    assert admin.user is not None
    name_admins()  # the operator names no one any more
    try:
        assert sweeper.sweep_once()["unshared"] >= 1
        assert admin.get(path).json()["data"]["visibility"] == "private"
        assert other.get(path).status_code == 404
        assert run(other, capability)["status"] == "failed"
        assert len(agent.calls) == calls
        assert run(admin, capability)["status"] == "completed", "it still serves its owner"
        assert sweeper.sweep_once()["unshared"] == 0
    finally:
        name_admins(admin.user["userUuid"])


def test_a_stale_cached_list_never_routes_to_a_deleted_agent(
    user: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    """Even when the cache names the agent after its delete returned (an invalidation lost
    to a Redis blip), Postgres has the last word."""
    doomed, survivor = start_agent(agents), start_agent(agents)
    capability = unique_capability("stale")
    register_agent(user, capability, endpoint=doomed.url)
    register_agent(user, capability, endpoint=survivor.url)
    assert user.user is not None
    owner = uuid.UUID(user.user["userUuid"])
    stale = candidates_uncached(capability, owner)  # both agents, as read before the delete
    gone = next(a for a in stale if a["endpoint"] == doomed.url)
    assert user.delete(f"/agents/{gone['agentUuid']}").status_code == 200
    # Planted under the current generation, as if the delete's invalidation never happened.
    cache.set_json(
        capability_cache_key(capability, owner),
        {"generation": cache.counter(capability_generation_key(capability)), "agents": stale},
        60,
    )
    for _ in range(4):
        assert run(user, capability)["status"] == "completed"
    assert doomed.calls == [], "the deleted agent got no stage"
    assert len(survivor.calls) == 4


def test_a_lookup_racing_a_delete_cannot_cache_its_stale_list(user: Api) -> None:
    capability = unique_capability("race")
    register_agent(user, capability)
    # A lookup reads the generation, then Postgres (before the delete commits)...
    assert user.user is not None
    owner = uuid.UUID(user.user["userUuid"])
    before = cache.counter(capability_generation_key(capability))
    stale = candidates_uncached(capability, owner, generation=before)
    assert len(stale) == 1
    assert user.delete(f"/agents/{stale[0]['agentUuid']}").status_code == 200
    # ...and writes its list after the delete returned.
    cache.set_json(
        capability_cache_key(capability, owner), {"generation": before, "agents": stale}, 60
    )
    assert eligible(capability, owner) == []


def test_no_cached_candidate_list_holds_another_users_private_agents(
    user: Api, api: Api, admin: Api, poller: Any
) -> None:
    """What a worker reads to route a stage is the submitter's agents and shared ones: a
    user who registers many private agents under a popular capability neither puts their
    endpoints and encrypted tokens in front of every other user's workers, nor makes
    every other user's stage pay to read them."""
    capability = unique_capability("crowded")
    mine = {register_agent(user, capability)["agentUuid"] for _ in range(3)}
    other = api.as_new_user()
    theirs = {register_agent(other, capability)["agentUuid"]}
    shared = {register_agent(admin, capability, visibility="shared")["agentUuid"]}
    assert run(other, capability)["status"] == "completed"
    assert run(user, capability)["status"] == "completed"
    lists = [
        {a["agentUuid"] for a in entry["agents"]}
        for key in cache.get_redis().scan_iter(match=f"maof:agents:capability:{capability}*")
        if (entry := cache.get_json(key)) is not None
    ]
    assert sorted(map(sorted, lists)) == sorted([sorted(mine | shared), sorted(theirs | shared)])
