"""The agent registry over HTTP: registration and its validation, listing and filters,
reading, deleting, and how the engine routes stages to registered agents."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select, update

from chalicelib import cache
from chalicelib.agents import health
from chalicelib.agents.candidates import (
    cached_candidates,
    capability_cache_key,
    capability_generation_key,
    invalidate_capability,
)
from chalicelib.agents.health import health_url
from chalicelib.agents.secrets import decrypt_token, reencrypt_all
from chalicelib.db import session_scope
from chalicelib.db.models import Agent
from tests.conftest import TEST_DATABASE_NAME
from tests.integration.conftest import (
    Api,
    admin_sql,
    end_app_sessions,
    register_agent,
    unique_capability,
    wait_for_run,
    wait_until,
)

# settings_env (a fixture) restores the settings `apply` lowers, as in test_limits.py.
from tests.integration.test_limits import apply, rate_limited, settings_env  # noqa: F401
from tests.integration.test_redis_down import redis_unreachable
from tests.support.agents import ScriptedAgent, gated, start_agent


def agent_body(capability: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "agentId": f"agent-{uuid.uuid4().hex[:10]}",
        "name": "Test agent",
        "endpoint": "mock://summarizer",
        "authToken": f"secret-{uuid.uuid4().hex}",
        "capabilities": [capability or unique_capability()],
        **fields,
    }


def error_of(response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    return dict(body["error"])


def fields_of(error: dict[str, Any]) -> list[str]:
    return [d["field"] for d in error.get("details") or []]


def submit(client: Api, stages: list[dict[str, Any]], name: str = "agents-test") -> str:
    response = client.post("/workflows/execute", {"workflow": {"name": name, "stages": stages}})
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["workflowRunId"])


def one_stage(capability: str, sid: str = "only") -> list[dict[str, Any]]:
    return [{"id": sid, "name": sid.upper(), "agentCapability": capability}]


def listed(client: Api, **params: Any) -> list[str]:
    response = client.get("/agents", params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    return [a["agentUuid"] for a in response.json()["data"]["agents"]]


# ------------------------------------------------------------------ register


def test_registering_an_agent_answers_201_with_its_public_view(user):
    capability = unique_capability("summarize")
    body = agent_body(capability, description="Summarizes text")
    response = user.post("/agents/register", body)
    assert response.status_code == 201, response.text
    agent = response.json()["data"]
    uuid.UUID(agent["agentUuid"])
    assert agent["agentId"] == body["agentId"]
    assert agent["name"] == body["name"]
    assert agent["description"] == "Summarizes text"
    assert agent["endpoint"] == body["endpoint"]
    assert agent["capabilities"] == [capability]
    assert agent["maxConcurrentTasks"] == 5
    assert agent["status"] == "online"
    assert agent["ownerUserUuid"] == user.user["userUuid"]
    assert "authToken" not in agent and "auth_token" not in agent


def test_max_concurrent_tasks_and_duplicate_capabilities_are_taken_as_given(user):
    capability = unique_capability()
    response = user.post(
        "/agents/register",
        agent_body(
            capability, capabilities=[capability, "other-cap", capability], maxConcurrentTasks=100
        ),
    )
    assert response.status_code == 201, response.text
    agent = response.json()["data"]
    assert agent["maxConcurrentTasks"] == 100
    assert agent["capabilities"] == [capability, "other-cap"]


def test_the_auth_token_is_never_returned_and_is_stored_encrypted(user):
    capability = unique_capability("secret")
    body = agent_body(capability)
    token = body["authToken"]
    registered = user.post("/agents/register", body)
    assert registered.status_code == 201
    assert token not in registered.text
    agent_uuid = registered.json()["data"]["agentUuid"]

    got = user.get(f"/agents/{agent_uuid}")
    assert got.status_code == 200
    assert token not in got.text
    listing = user.get("/agents", params={"capability": capability})
    assert listing.status_code == 200
    assert [a["agentUuid"] for a in listing.json()["data"]["agents"]] == [agent_uuid]
    assert token not in listing.text
    assert token not in user.get("/agents").text

    with session_scope() as session:
        stored = session.scalar(
            select(Agent.auth_token_encrypted).where(Agent.id == uuid.UUID(agent_uuid))
        )
    assert stored is not None
    assert stored != token
    assert token not in stored
    assert decrypt_token(stored) == token


NOT_URLS = ["ftp://x", "/relative", "not a url", "http://", "http://:80/path", "mailto:a@b.c"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"agentId": ""}, "agentId"),
        ({"agentId": "a" * 256}, "agentId"),
        ({"name": None}, "name"),
        ({"name": ""}, "name"),
        # Shown to other users (a shared agent) and on terminals: no escape codes.
        ({"agentId": "agent\x1b[2J"}, "agentId"),
        ({"name": "Summarizer\x9b2J"}, "name"),
        ({"name": "two\nlines"}, "name"),
        ({"description": "\x1b[2J\x1b[31mURGENT: sign in again\x1b[0m"}, "description"),
        ({"description": "C1's CSI \x9b31m"}, "description"),
        ({"description": "overwrite\rthe line"}, "description"),
        # Unicode format and separator characters: shown reversed, split or not at all.
        ({"agentId": "agent-\u202efdp.exe"}, "agentId"),
        ({"name": "\u2066Summarizer\u2069"}, "name"),
        ({"name": "zero\u200bwidth"}, "name"),
        ({"name": "line\u2028separator"}, "name"),
        ({"description": "para\u2029graph"}, "description"),
        ({"description": "\u202eevil"}, "description"),
        # Never sent: tasks and probes go to the path and query.
        ({"endpoint": "http://127.0.0.1:9/agent#fragment"}, "endpoint"),
        *[({"endpoint": url}, "endpoint") for url in NOT_URLS],
        ({"authToken": ""}, "authToken"),
        ({"authToken": "t" * 1025}, "authToken"),
        # Sent in an HTTP header: beyond Latin-1 no request could carry it.
        ({"authToken": "secret-\u20ac-token"}, "authToken"),
        ({"authToken": "secret\ttoken"}, "authToken"),
        ({"capabilities": []}, "capabilities"),
        ({"capabilities": ["good-tag", "Bad Tag"]}, "capabilities.1"),
        ({"capabilities": ["UPPER"]}, "capabilities.0"),
        ({"capabilities": ["a..b"]}, "capabilities.0"),
        ({"capabilities": ["trailing-newline\n"]}, "capabilities.0"),
        ({"capabilities": ["x" * 101]}, "capabilities.0"),
        ({"maxConcurrentTasks": 0}, "maxConcurrentTasks"),
        ({"maxConcurrentTasks": 101}, "maxConcurrentTasks"),
        # JSON's true and "3" are not integers (they were taken as 1 and 3 slots).
        ({"maxConcurrentTasks": True}, "maxConcurrentTasks"),
        ({"maxConcurrentTasks": False}, "maxConcurrentTasks"),
        ({"maxConcurrentTasks": "3"}, "maxConcurrentTasks"),
        ({"maxConcurrentTasks": " 4 "}, "maxConcurrentTasks"),
        ({"maxConcurrentTasks": 2.5}, "maxConcurrentTasks"),
        ({"unexpected": True}, "unexpected"),
    ],
)
def test_an_invalid_registration_is_a_400_naming_the_field(user, change, field):
    body = agent_body()
    for key, value in change.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    error = error_of(user.post("/agents/register", body), 400, "VALIDATION_ERROR")
    assert field in fields_of(error)
    assert field.split(".")[0] in error["message"]
    if body.get("authToken"):
        assert body["authToken"] not in str(error)


def test_the_longest_allowed_values_are_accepted(user):
    longest_id = uuid.uuid4().hex.ljust(255, "a")
    body = agent_body(agentId=longest_id, authToken="t" * 1024, maxConcurrentTasks=1)
    body["name"] = "Résumé agent — 要約 ✓"  # any printable text
    response = user.post("/agents/register", body)
    assert response.status_code == 201, response.text
    assert response.json()["data"]["agentId"] == longest_id
    assert response.json()["data"]["name"] == body["name"]


def test_a_slot_count_written_with_a_zero_fraction_is_accepted(user):
    response = user.post("/agents/register", agent_body(maxConcurrentTasks=3.0))
    assert response.status_code == 201, response.text
    assert response.json()["data"]["maxConcurrentTasks"] == 3


def test_a_description_may_run_over_lines_with_tabs(user):
    description = "Summarizes text.\n\tInput: {text}\n\tOutput: {summary} — 要約 ✓"
    response = user.post("/agents/register", agent_body(description=description))
    assert response.status_code == 201, response.text
    assert response.json()["data"]["description"] == description


def test_a_duplicate_agent_id_is_a_409_conflict(user, api):
    body = agent_body()
    assert user.post("/agents/register", body).status_code == 201
    again = agent_body(agentId=body["agentId"])
    error = error_of(user.post("/agents/register", again), 409, "CONFLICT")
    assert body["agentId"] in error["message"]
    assert fields_of(error) == ["agentId"]


def test_agent_ids_are_per_account(user, api):
    """Another account's agentIds neither conflict with yours nor can be found out by
    trying them (a 409 across accounts told that they existed, and let anyone take the
    names another account's scripts register)."""
    body = agent_body()
    mine = user.post("/agents/register", body)
    assert mine.status_code == 201, mine.text
    other = api.as_new_user()
    theirs = other.post("/agents/register", agent_body(agentId=body["agentId"]))
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["data"]["agentUuid"] != mine.json()["data"]["agentUuid"]
    # Each sees, and routes to, only its own.
    for client, registered in ((user, mine), (other, theirs)):
        listed = client.get("/agents", params={"limit": 100}).json()["data"]["agents"]
        same_id = [a["agentUuid"] for a in listed if a["agentId"] == body["agentId"]]
        assert same_id == [registered.json()["data"]["agentUuid"]]
    # Deleting one frees its id for its owner only.
    assert user.delete(f"/agents/{mine.json()['data']['agentUuid']}").status_code == 200
    assert user.post("/agents/register", agent_body(agentId=body["agentId"])).status_code == 201
    error_of(other.post("/agents/register", agent_body(agentId=body["agentId"])), 409, "CONFLICT")


def test_registering_without_a_token_is_a_401(api):
    error_of(api.post("/agents/register", agent_body()), 401, "UNAUTHORIZED")
    bad = Api(api.base_url, token="not-a-jwt")
    error_of(bad.post("/agents/register", agent_body()), 401, "UNAUTHORIZED")


def test_every_agent_route_needs_authentication(api, user):
    agent = register_agent(user, unique_capability())
    for method, path in (
        ("GET", "/agents"),
        ("GET", f"/agents/{agent['agentUuid']}"),
        ("DELETE", f"/agents/{agent['agentUuid']}"),
    ):
        error_of(api.request(method, path), 401, "UNAUTHORIZED")
    assert user.get(f"/agents/{agent['agentUuid']}").status_code == 200


# ------------------------------------------------------------------ list


def test_listing_pages_through_agents_with_meta(user):
    capability = unique_capability("paged")
    registered = [register_agent(user, capability)["agentUuid"] for _ in range(3)]

    first = user.get("/agents", params={"capability": capability, "limit": 2})
    assert first.status_code == 200
    data = first.json()["data"]
    assert data["meta"] == {"total": 3, "page": 1, "limit": 2, "pages": 2}
    assert len(data["agents"]) == 2

    second = user.get("/agents", params={"capability": capability, "limit": 2, "page": 2}).json()
    assert second["data"]["meta"] == {"total": 3, "page": 2, "limit": 2, "pages": 2}
    assert len(second["data"]["agents"]) == 1

    seen = [a["agentUuid"] for a in data["agents"] + second["data"]["agents"]]
    assert sorted(seen) == sorted(registered)
    assert seen == list(reversed(registered)), "newest first"

    beyond = user.get("/agents", params={"capability": capability, "limit": 2, "page": 3}).json()
    assert beyond["data"] == {"agents": [], "meta": {"total": 3, "page": 3, "limit": 2, "pages": 2}}


def test_listing_defaults_to_page_1_of_20(user):
    register_agent(user, unique_capability())
    meta = user.get("/agents").json()["data"]["meta"]
    assert meta["page"] == 1 and meta["limit"] == 20
    assert meta["total"] >= 1
    assert meta["pages"] == (meta["total"] + 19) // 20


def test_filtering_by_capability_is_an_exact_match(user):
    base = unique_capability("code-audit")
    general = register_agent(user, base)["agentUuid"]
    python = register_agent(user, f"{base}.python")["agentUuid"]
    both = register_agent(user, base, capabilities=[f"{base}.python", base])["agentUuid"]

    assert sorted(listed(user, capability=base)) == sorted([general, both])
    assert sorted(listed(user, capability=f"{base}.python")) == sorted([python, both])
    assert listed(user, capability=f"{base}.py") == []
    assert listed(user, capability=f"{base}.python.django") == []


def test_filtering_by_status(user):
    capability = unique_capability("status")
    online = register_agent(user, capability)["agentUuid"]
    degraded = register_agent(user, capability)["agentUuid"]
    with session_scope() as session:
        session.execute(
            update(Agent).where(Agent.id == uuid.UUID(degraded)).values(status="degraded")
        )
    assert listed(user, capability=capability, status="online") == [online]
    assert listed(user, capability=capability, status="degraded") == [degraded]
    assert listed(user, capability=capability, status="offline") == []
    agents = user.get("/agents", params={"status": "degraded", "limit": 100}).json()["data"][
        "agents"
    ]
    assert agents and {a["status"] for a in agents} == {"degraded"}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "sleeping"}, "status"),
        ({"status": "ONLINE"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"page": 0}, "page"),
        ({"page": "two"}, "page"),
        ({"limit": "10_0"}, "limit"),
        ({"limit": " 10"}, "limit"),
        ({"page": "+2"}, "page"),
        ({"limit": "10 "}, "limit"),
        ({"capability": "Bad Tag"}, "capability"),
        ({"owner": "me"}, "owner"),
    ],
)
def test_invalid_list_parameters_are_a_400_naming_them(user, params, field):
    error = error_of(user.get("/agents", params=params), 400, "VALIDATION_ERROR")
    assert fields_of(error) == [field]


def test_limit_1_and_100_are_accepted(user):
    for limit in (1, 100):
        response = user.get("/agents", params={"limit": limit})
        assert response.status_code == 200
        assert response.json()["data"]["meta"]["limit"] == limit
        assert len(response.json()["data"]["agents"]) <= limit


# ------------------------------------------------------------------ get


def test_the_owner_reads_an_agent_by_uuid(user):
    agent = register_agent(user, unique_capability())
    response = user.get(f"/agents/{agent['agentUuid']}")
    assert response.status_code == 200
    assert response.json()["data"] == agent


@pytest.mark.parametrize(
    "agent_uuid",
    [
        "1f0c3c9e-5b7a-4d2e-9a41-6b8f2d7e0c15",
        "not-a-uuid",
        "12345",
        "00000000-0000-0000-0000-00000000000g",
    ],
)
def test_an_unknown_or_malformed_agent_uuid_is_a_404(user, agent_uuid):
    error = error_of(user.get(f"/agents/{agent_uuid}"), 404, "NOT_FOUND")
    assert error["message"] == "Agent not found"
    error_of(user.delete(f"/agents/{agent_uuid}"), 404, "NOT_FOUND")


# ------------------------------------------------------------------ change


def test_sharing_an_agent_not_yours_answers_as_every_agent_route_does(user, api, admin):
    """A non-admin asking to share: 404 for an unknown agent and another user's private
    one, exactly as any other body gets (the 403 for sharing told that the agent existed);
    403 for another's shared agent (not its owner) and for the caller's own."""
    share = {"visibility": "shared"}
    others = register_agent(api.as_new_user(), unique_capability())
    for agent_uuid in (str(uuid.uuid4()), others["agentUuid"]):
        error = error_of(
            user.request("PATCH", f"/agents/{agent_uuid}", json=share), 404, "NOT_FOUND"
        )
        assert error["message"] == "Agent not found"
    shared = register_agent(admin, unique_capability(), visibility="shared")
    error = error_of(
        user.request("PATCH", f"/agents/{shared['agentUuid']}", json=share), 403, "FORBIDDEN"
    )
    assert "owner" in error["message"]
    mine = register_agent(user, unique_capability())
    error = error_of(
        user.request("PATCH", f"/agents/{mine['agentUuid']}", json=share), 403, "FORBIDDEN"
    )
    assert "admin" in error["message"]
    assert user.get(f"/agents/{mine['agentUuid']}").json()["data"]["visibility"] == "private"


# ------------------------------------------------------------------ health checks


def probes(agent: ScriptedAgent) -> list[str]:
    """The paths of the health probes that reached `agent`."""
    return [seen.path for seen in agent.seen if seen.method == "GET"]


def test_the_health_probe_is_the_endpoints_path_and_health_with_its_query(user, agents):
    """docs/protocol.md: `GET <endpoint>/health`. An endpoint with a query had /health
    glued onto the query, so the probe went to the task path itself."""
    target = start_agent(agents)
    endpoint = target.url + "?tenant=acme"
    agent = register_agent(user, unique_capability("query"), endpoint=endpoint)
    assert agent["endpoint"] == endpoint
    checked = user.post(f"/agents/{agent['agentUuid']}/health-check")
    assert checked.status_code == 200, checked.text
    assert probes(target) == ["/agent/health?tenant=acme"] * 2  # registration, health-check


@pytest.mark.parametrize(
    ("endpoint", "probed"),
    [
        ("http://a.example/agent", "http://a.example/agent/health"),
        ("http://a.example/agent/", "http://a.example/agent/health"),
        ("http://a.example", "http://a.example/health"),
        ("http://a.example?tenant=acme", "http://a.example/health?tenant=acme"),
        ("https://a.example:8443/v1/run/?a=1&b=2", "https://a.example:8443/v1/run/health?a=1&b=2"),
        # Registered before fragments were refused: the fragment is never sent.
        ("http://a.example/agent?x=1#part", "http://a.example/agent/health?x=1"),
    ],
)
def test_health_url_appends_health_to_the_path(endpoint, probed):
    assert health_url(endpoint) == probed


@pytest.mark.usefixtures("settings_env")
def test_health_checks_past_the_limit_answer_429_and_probe_nothing(user, api, agents):
    """Every health-check is a GET from MAOF to whatever the agent names: without a limit,
    one agent and a loop made MAOF a source of requests by the thousand (docs/security.md).
    The probe at registration counts too."""
    apply({}, MAOF_HEALTH_CHECKS_PER_MINUTE="3")
    target = start_agent(agents)
    agent = register_agent(user, unique_capability("hc"), endpoint=target.url)
    path = f"/agents/{agent['agentUuid']}/health-check"
    assert [user.post(path).status_code for _ in range(2)] == [200, 200]
    error = rate_limited(user.post(path))
    assert "health check" in error["message"]
    assert len(probes(target)) == 3, "the refused check sent no probe"
    # A registration that would probe is refused too, and makes no agent; a mock agent's
    # probe sends nothing and is not counted.
    capability = unique_capability("hc")
    rate_limited(user.post("/agents/register", agent_body(capability, endpoint=target.url)))
    assert listed(user, capability=capability) == []
    assert len(probes(target)) == 3
    mock = register_agent(user, capability)
    assert user.post(f"/agents/{mock['agentUuid']}/health-check").status_code == 200
    # Another user has a limit of their own.
    other = api.as_new_user()
    theirs = register_agent(other, unique_capability("hc"), endpoint=target.url)
    assert other.post(f"/agents/{theirs['agentUuid']}/health-check").status_code == 200
    assert len(probes(target)) == 5


@pytest.mark.usefixtures("settings_env")
def test_registering_and_deleting_in_a_loop_probes_within_the_limit(user, agents):
    """The agent quota counts live agents only: register, delete, register again probed
    at once each time, without limit."""
    apply({}, MAOF_HEALTH_CHECKS_PER_MINUTE="3", MAOF_MAX_AGENTS_PER_USER="1")
    target, capability = start_agent(agents), unique_capability("loop")
    for _ in range(3):
        agent = register_agent(user, capability, endpoint=target.url)
        assert user.delete(f"/agents/{agent['agentUuid']}").status_code == 200
    rate_limited(user.post("/agents/register", agent_body(capability, endpoint=target.url)))
    assert len(probes(target)) == 3
    assert listed(user, capability=capability) == []


@pytest.mark.usefixtures("settings_env")
def test_health_checks_go_on_while_redis_is_down(user, agents):
    """The limit fails open, as the submission rate does: a probe is one GET per request,
    and registering an agent must not need Redis."""
    apply({}, MAOF_HEALTH_CHECKS_PER_MINUTE="1")
    target = start_agent(agents)
    with redis_unreachable():
        agent = register_agent(user, unique_capability("noredis"), endpoint=target.url)
        checked = [user.post(f"/agents/{agent['agentUuid']}/health-check") for _ in range(2)]
    assert [r.status_code for r in checked] == [200, 200]
    assert checked[-1].json()["data"]["status"] == "online"
    assert len(probes(target)) == 3


# ------------------------------------------------------------------ delete


def test_another_user_cannot_delete_a_private_agent_it_cannot_see(user, api):
    agent = register_agent(user, unique_capability())
    error_of(api.as_new_user().delete(f"/agents/{agent['agentUuid']}"), 404, "NOT_FOUND")
    assert user.get(f"/agents/{agent['agentUuid']}").status_code == 200


def test_only_the_owner_can_delete_a_shared_agent(admin, api):
    agent = register_agent(admin, unique_capability(), visibility="shared")
    error = error_of(api.as_new_user().delete(f"/agents/{agent['agentUuid']}"), 403, "FORBIDDEN")
    assert "owner" in error["message"]
    assert admin.get(f"/agents/{agent['agentUuid']}").status_code == 200


def test_a_deleted_agent_is_gone_from_reads_and_lists(user):
    capability = unique_capability("gone")
    agent = register_agent(user, capability)
    keep = register_agent(user, capability)
    path = f"/agents/{agent['agentUuid']}"

    deleted = user.delete(path)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["data"] == {"agentUuid": agent["agentUuid"], "deleted": True}

    error_of(user.get(path), 404, "NOT_FOUND")
    assert listed(user, capability=capability) == [keep["agentUuid"]]
    assert agent["agentUuid"] not in listed(user, status="online")
    meta = user.get("/agents", params={"capability": capability}).json()["data"]["meta"]
    assert meta["total"] == 1
    error_of(user.delete(path), 404, "NOT_FOUND")


def test_the_agent_id_of_a_deleted_agent_can_be_registered_again(user):
    capability = unique_capability()
    first = register_agent(user, capability)
    assert user.delete(f"/agents/{first['agentUuid']}").status_code == 200
    again = register_agent(user, capability, agentId=first["agentId"])
    assert again["agentId"] == first["agentId"]
    assert again["agentUuid"] != first["agentUuid"]
    assert listed(user, capability=capability) == [again["agentUuid"]]
    error_of(user.get(f"/agents/{first['agentUuid']}"), 404, "NOT_FOUND")


def test_an_agent_deleted_while_its_first_probe_runs_was_still_registered(user, agents):
    """Registration stores the agent, then probes it; its owner's other clients list it at
    once, and one may delete it meanwhile. The registration answered an undocumented 404
    "Agent not found"; it answers 201 with the agent as stored, as it would have just
    before the delete."""
    target = start_agent(agents)
    target.health_script.append((1.5, 200, b'{"status": "healthy"}'))  # a slow probe
    capability = unique_capability("regdel")
    with ThreadPoolExecutor(1) as pool:
        registering = pool.submit(
            user.post, "/agents/register", agent_body(capability, endpoint=target.url)
        )
        wait_until(lambda: probes(target), timeout=5)  # stored, and being probed
        (agent_uuid,) = listed(user, capability=capability)
        assert user.delete(f"/agents/{agent_uuid}").status_code == 200
        response = registering.result(timeout=10)
    assert response.status_code == 201, response.text
    agent = response.json()["data"]
    assert agent["agentUuid"] == agent_uuid
    assert agent["capabilities"] == [capability]
    assert listed(user, capability=capability) == []


def test_an_agent_whose_probe_the_database_could_not_record_was_still_registered(user, monkeypatch):
    """The database goes away after the new agent's row committed, while it is probed:
    the registration answered 503 "try again shortly", and trying again got 409 for the
    agent it was told was not registered. It answers 201 with the agent as stored: never
    checked, so offline (not routed to) until the scheduled check finds it."""
    real_probe = health.probe

    def probe_then_outage(endpoint: str) -> str | None:
        status = real_probe(endpoint)
        admin_sql(f"ALTER DATABASE {TEST_DATABASE_NAME} CONNECTION LIMIT 0")
        end_app_sessions()
        return status

    monkeypatch.setattr(health, "probe", probe_then_outage)
    body = agent_body(unique_capability("regdown"))
    try:
        response = user.post("/agents/register", body)
    finally:
        admin_sql(f"ALTER DATABASE {TEST_DATABASE_NAME} CONNECTION LIMIT -1")
    monkeypatch.undo()
    assert response.status_code == 201, response.text
    agent = response.json()["data"]
    assert (agent["status"], agent["lastHealthCheck"]) == ("offline", None)
    assert listed(user, capability=body["capabilities"][0]) == [agent["agentUuid"]]
    again = user.post("/agents/register", body)
    assert again.status_code == 409, again.text  # registered: the answer said so


def test_a_deleted_agents_token_is_no_longer_stored_and_its_call_in_flight_still_counts(
    user, poller, agents
):
    """A deleted agent's token stayed stored (and was re-encrypted at every key rotation)
    for as long as the database lived, though nothing calls a deleted agent again. It is
    cleared with the delete; the stage that was calling the agent used the token its
    candidate list held, and its answer completes the run."""
    gate = threading.Event()
    held = start_agent(agents, default=gated(gate))
    capability = unique_capability("forget")
    token = f"secret-{uuid.uuid4().hex}"
    agent = register_agent(user, capability, endpoint=held.url, authToken=token)
    run_id = submit(user, one_stage(capability))
    wait_until(lambda: len(held.calls) == 1, timeout=20)
    assert user.delete(f"/agents/{agent['agentUuid']}").status_code == 200
    with session_scope() as session:
        stored = session.scalar(
            select(Agent.auth_token_encrypted).where(Agent.id == uuid.UUID(agent["agentUuid"]))
        )
    assert stored is None
    gate.set()
    assert wait_for_run(user, run_id)["status"] == "completed"
    assert held.calls[0].headers["Authorization"] == f"Bearer {token}"
    assert reencrypt_all().unreadable == 0  # what was cleared is not a secret to move


# ------------------------------------------------------------------ routing


def test_deleted_agent_is_never_routed_to(user, poller):
    capability = unique_capability("routed")
    agent = register_agent(user, capability)

    warm = wait_for_run(user, submit(user, one_stage(capability)))
    assert warm["status"] == "completed", warm
    assert warm["stages"][0]["agentUuid"] == agent["agentUuid"]
    warm_entry = cache.get_json(capability_cache_key(capability, agent["ownerUserUuid"]))
    generation = cache.counter(capability_generation_key(capability))
    assert cached_candidates(warm_entry, generation), "the capability cache is warm"

    assert user.delete(f"/agents/{agent['agentUuid']}").status_code == 200
    generation = cache.counter(capability_generation_key(capability))
    assert cached_candidates(warm_entry, generation) is None, "delete retires the cached list"

    run = wait_for_run(user, submit(user, one_stage(capability)))
    assert run["status"] == "failed", run
    assert capability in run["errorMessage"]
    stage = run["stages"][0]
    assert stage["status"] == "failed"
    assert capability in stage["errorMessage"]
    assert stage["agentUuid"] is None


def test_stages_go_to_the_remaining_agent_after_another_is_deleted(user, poller):
    capability = unique_capability("survivor")
    doomed = register_agent(user, capability)
    survivor = register_agent(user, capability)
    stages = [{"id": f"s{i}", "name": f"S{i}", "agentCapability": capability} for i in range(4)]
    assert wait_for_run(user, submit(user, stages))["status"] == "completed"

    assert user.delete(f"/agents/{doomed['agentUuid']}").status_code == 200
    run = wait_for_run(user, submit(user, stages))
    assert run["status"] == "completed", run
    assert {s["agentUuid"] for s in run["stages"]} == {survivor["agentUuid"]}


def test_a_newly_registered_agent_is_routed_to_despite_a_cached_miss(user, poller):
    capability = unique_capability("late")
    missed = wait_for_run(user, submit(user, one_stage(capability)))
    assert missed["status"] == "failed"
    agent = register_agent(user, capability)
    run = wait_for_run(user, submit(user, one_stage(capability)))
    assert run["status"] == "completed", run
    assert run["stages"][0]["agentId"] == agent["agentId"]


def _evicted(capability: str, register: Any) -> None:
    register()
    # volatile-lru evicts it (it has a TTL), or a failover goes to a replica that lagged
    cache.get_redis().delete(capability_generation_key(capability))


def _breaker_open(capability: str, register: Any) -> None:
    cache.RedisBreaker.trip()  # as one 0.5 s timeout in this process does, for a second
    try:
        register()
    finally:
        cache.RedisBreaker.close()
    assert cache.get_redis().get(capability_generation_key(capability)) is None


@pytest.mark.parametrize("lose", [_evicted, _breaker_open], ids=["evicted", "breaker-open"])
def test_a_registered_agent_is_routed_to_when_its_capabilitys_change_was_lost(user, poller, lose):
    """A list cached before an agent was registered, under a generation Redis then reads
    again (the change made with the breaker open, or its key lost), looked current: runs
    failed "No available agent" for the cache's TTL while the agent was registered and idle.
    A list with no usable agent is now read again from Postgres before a stage fails on it."""
    capability = unique_capability("lostchange")
    missed = wait_for_run(user, submit(user, one_stage(capability)))
    assert missed["status"] == "failed"  # and an empty list is cached
    owner = user.user["userUuid"]
    assert cache.get_json(capability_cache_key(capability, owner)) is not None
    agents: list[dict[str, Any]] = []
    lose(capability, lambda: agents.append(register_agent(user, capability)))
    run = wait_for_run(user, submit(user, one_stage(capability)))
    assert run["status"] == "completed", run
    assert run["stages"][0]["agentUuid"] == agents[0]["agentUuid"]


def test_independent_stages_are_spread_across_capable_agents(user, poller):
    capability = unique_capability("spread")
    agents = {register_agent(user, capability)["agentId"] for _ in range(3)}
    stages = [
        {"id": f"part-{i}", "name": f"Part {i}", "agentCapability": capability} for i in range(12)
    ]
    run = wait_for_run(user, submit(user, stages, name="fan-out"))
    assert run["status"] == "completed", run
    served = [s["agentId"] for s in run["stages"]]
    assert set(served) <= agents
    assert len(set(served)) > 1, f"all twelve stages went to one agent: {served}"


def test_an_offline_agent_is_not_routed_to(user, poller):
    capability = unique_capability("offline")
    offline = register_agent(user, capability)
    online = register_agent(user, capability)
    with session_scope() as session:
        session.execute(
            update(Agent)
            .where(Agent.id == uuid.UUID(offline["agentUuid"]))
            .values(status="offline")
        )
    invalidate_capability(capability)
    stages = [{"id": f"s{i}", "name": f"S{i}", "agentCapability": capability} for i in range(4)]
    run = wait_for_run(user, submit(user, stages))
    assert run["status"] == "completed", run
    assert {s["agentUuid"] for s in run["stages"]} == {online["agentUuid"]}
    assert listed(user, capability=capability, status="offline") == [offline["agentUuid"]]


def test_a_capabilitys_generation_expires_and_comes_back_past_every_value_it_had(user):
    """Every change to a capability's agents moved its generation on with an INCR that
    never expired: each capability name ever registered (a user may make up thousands and
    delete the agents again) left a Redis key for ever. It now expires some hours after
    the capability's last change, longer than any list is cached (MAOF_AGENT_CACHE_TTL_SECONDS
    is at most an hour), and one made afresh starts past every value it had: no list
    cached under an earlier generation can match it."""
    from chalicelib.agents import candidates

    capability = unique_capability("generation")
    key = capability_generation_key(capability)
    agent = register_agent(user, capability)
    kept = cache.get_redis().ttl(key)
    assert kept > 3600, f"TTL {kept}"  # -1: kept for ever
    assert kept <= candidates.GENERATION_KEPT_SECONDS
    before = cache.counter(key)
    assert before
    cache.get_redis().delete(key)  # as its expiry does
    assert user.delete(f"/agents/{agent['agentUuid']}").status_code == 200
    after = cache.counter(key)
    assert after is not None and after > before, (before, after)


def test_the_lists_a_worker_remembers_are_bounded(user, monkeypatch):
    """Capability names are users' to choose: a worker remembers the agents of at most
    LAST_SEEN_KEPT (capability, user) lists, however many it has routed."""
    from chalicelib.agents import selection

    monkeypatch.setattr(selection, "_last_seen", {})
    monkeypatch.setattr(selection, "LAST_SEEN_KEPT", 2)
    owner = uuid.UUID(user.user["userUuid"])
    for _ in range(5):
        selection.eligible(unique_capability("many"), owner)
        assert 1 <= len(selection._last_seen) <= 2
