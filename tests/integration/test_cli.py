"""The `maof` command line against the real stack: the API over HTTP (the same local server
`make dev` runs), LocalStack SQS drained by the poller, real agent servers. Commands run
in-process through click's CliRunner, and once as the installed `maof` executable."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from click.testing import CliRunner, Result

from chalicelib.auth import tokens
from chalicelib.core.api import Principal
from examples.agents import server as example_agent
from examples.agents.protocol import serve
from maof_client import MaofClient, NotFound
from maof_client.cli import cli
from maof_client.config import CredentialsFile
from maof_client.models import Tokens
from tests.integration.conftest import Api, free_port, unique_capability, unique_email, wait_until
from tests.integration.test_audit_signed import BEFORE_SIGNING, rewrite_unsigned
from tests.support.agents import ScriptedAgent, sleep

PROJECT_DIR = Path(__file__).resolve().parents[2]
EXAMPLES = PROJECT_DIR / "examples" / "workflows"
PASSWORD = "correct-horse-battery"


@dataclass
class Maof:
    """`maof …` in-process, against the test API, with its own config directory."""

    api_url: str
    config_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {"MAOF_API_URL": self.api_url, "MAOF_CONFIG_DIR": str(self.config_dir)}

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(cli, list(args), input=input, env=self.env)

    def ok(self, *args: str, input: str | None = None) -> Result:
        result = self(*args, input=input)
        assert result.exit_code == 0, f"maof {' '.join(args)}: {result.output}"
        return result

    def json(self, *args: str, input: str | None = None) -> Any:
        """The command's --json output, which must be JSON and nothing else."""
        return json.loads(self.ok(*args, "--json", input=input).stdout)

    @property
    def credentials(self) -> CredentialsFile:
        return CredentialsFile(self.api_url, self.config_dir)

    def stored(self) -> Tokens:
        found = self.credentials.load()
        assert found is not None
        return found


@pytest.fixture
def maof(api_url: str, tmp_path: Path) -> Maof:
    return Maof(api_url, tmp_path / "config" / "maof")


@pytest.fixture
def signed_in(maof: Maof) -> str:
    """A new account, signed in through the CLI; its email."""
    email = unique_email()
    maof.ok("register", "--email", email, "--name", "CLI", "--password-stdin", input=PASSWORD)
    maof.ok("login", "--email", email, "--password-stdin", input=f"{PASSWORD}\n")
    return email


@pytest.fixture
def example_agent_url() -> Iterator[str]:
    """The example agent `make dev` runs (examples/agents/server.py), on a free port."""
    port = free_port()
    server = serve(example_agent.agent, "127.0.0.1", port, "/agent", "agent-secret-key")
    yield f"http://127.0.0.1:{port}/agent"
    server.shutdown()


def register_agent(maof: Maof, endpoint: str, *capabilities: str) -> dict[str, Any]:
    flags = [flag for capability in capabilities for flag in ("--capability", capability)]
    agent_id = f"cli-agent-{uuid.uuid4().hex[:8]}"
    return dict(
        maof.json(
            "agents",
            "register",
            "--agent-id",
            agent_id,
            "--name",
            "CLI test agent",
            "--endpoint",
            endpoint,
            "--auth-token",
            "agent-secret-key",
            *flags,
            "--max-concurrent",
            "3",
        )
    )


def workflow_file(directory: Path, *capabilities: str, name: str = "cli-pipeline") -> Path:
    """A chain of one stage per capability, as a YAML workflow (no input)."""
    stages = []
    for index, capability in enumerate(capabilities):
        stage: dict[str, Any] = {"id": f"s{index + 1}", "name": f"Stage {index + 1}"}
        stage["agentCapability"] = capability
        if index:
            stage["dependencies"] = [f"s{index}"]
        stages.append(stage)
    path = directory / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "stages": stages}))
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ signing in


def test_login_reads_the_password_from_stdin_and_keeps_tokens_owner_only(
    maof: Maof, signed_in: str
) -> None:
    assert mode(maof.config_dir) == 0o700
    assert mode(maof.credentials.path) == 0o600
    stored = maof.stored()
    assert stored.email == signed_in
    me = maof.json("whoami")
    assert me["email"] == signed_in
    assert me["userUuid"] in maof.ok("whoami").stdout  # what MAOF_ADMIN_USER_UUIDS takes
    again = maof.ok("login", "--email", signed_in, "--password-stdin", input=PASSWORD)
    assert f"as {signed_in}" in again.stdout
    fresh = maof.stored()
    assert fresh.refresh_token != stored.refresh_token  # a new session
    assert fresh.access_token not in again.output and fresh.refresh_token not in again.output
    as_json = maof.json("login", "--email", signed_in, "--password-stdin", input=PASSWORD)
    assert as_json["user"]["email"] == signed_in
    assert set(as_json) == {"user"}  # the tokens are never printed


def test_a_wrong_password_exits_1_with_the_api_error(maof: Maof, signed_in: str) -> None:
    result = maof("login", "--email", signed_in, "--password-stdin", input="wrong-password")
    assert result.exit_code == 1
    assert "Invalid email or password [UNAUTHORIZED]" in result.stderr
    assert "request id:" in result.stderr
    assert result.stdout == ""


def test_without_a_session_commands_say_how_to_sign_in(maof: Maof) -> None:
    result = maof("runs")
    assert result.exit_code == 1
    assert f"Not signed in to {maof.api_url}" in result.stderr
    assert "maof login" in result.stderr


# ------------------------------------------------------------------ runs


def test_run_watch_completes_the_example_pipeline_and_prints_its_result(
    maof: Maof, signed_in: str, poller: Any, example_agent_url: str
) -> None:
    agent = register_agent(
        maof, example_agent_url, "text-generation", "extraction", "translation", "summarization"
    )
    assert agent["status"] == "online"
    result = maof("run", str(EXAMPLES / "extract-translate-summarize.yaml"), "--watch")
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout)  # the result alone on stdout
    assert output["summary"] and output["wordCount"] > 0
    # The watch view (stderr): every stage, its status and agent; then the outcome.
    for stage in ("extract", "translate", "summarize"):
        line = next(line for line in result.stderr.splitlines() if line.startswith(stage))
        assert "completed" in line and agent["agentId"] in line
    assert "completed. Result:" in result.stderr


def test_a_failing_workflow_exits_1_naming_the_stage(
    maof: Maof, signed_in: str, poller: Any
) -> None:
    register_agent(maof, "mock://cli-text", "text-generation")
    failing = str(EXAMPLES / "missing-capability.yaml")
    result = maof("run", failing, "--input", '{"text": "hi"}', "--watch")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    summary = result.stderr.strip().splitlines()[-1]
    assert "failed at stage 'classify'" in summary
    assert "No available agent has the capability 'classification.no-agent-has-this'" in summary
    as_json = maof("run", failing, "--input", '{"text": "hi"}', "--watch", "--json")
    assert as_json.exit_code == 1
    run = json.loads(as_json.stdout)
    assert run["status"] == "failed"
    assert [s["status"] for s in run["stages"]] == ["completed", "failed"]


def test_every_command_prints_parseable_json(
    maof: Maof, signed_in: str, poller: Any, tmp_path: Path
) -> None:
    capability = unique_capability("cli")
    assert maof.json("health")["status"] == "ok"
    assert maof.json("whoami")["email"] == signed_in
    agent = register_agent(maof, "mock://cli-json", capability)
    listed = maof.json("agents", "list", "--capability", capability)
    assert [a["agentId"] for a in listed["agents"]] == [agent["agentId"]]
    assert maof.json("agents", "show", agent["agentId"])["agentUuid"] == agent["agentUuid"]
    assert maof.json("agents", "check", agent["agentUuid"])["status"] == "online"
    path = workflow_file(tmp_path, capability, capability)
    submitted = maof.json("run", str(path), "--input", '{"text": "json"}')
    assert submitted["status"] == "queued"
    run_id = submitted["workflowRunId"]
    ended = wait_until(lambda: (r := maof.json("status", run_id))["status"] == "completed" and r)
    assert [s["status"] for s in ended["stages"]] == ["completed", "completed"]
    watched = maof.json("run", str(path), "--input", '{"text": "again"}', "--watch")
    assert watched["status"] == "completed"
    result = maof.json("result", run_id)
    assert result["workflowRunId"] == run_id and result["output"]["capability"] == capability
    completed = maof.json("runs", "--status", "completed", "--limit", "100")
    assert {run_id, watched["workflowRunId"]} <= {r["workflowRunId"] for r in completed["runs"]}
    trail = maof.json("audit", run_id)
    assert trail["chain"]["valid"] and trail["chain"]["length"] == len(trail["logs"])
    assert maof.json("audit", run_id, "--verify")["chain"]["head"] == trail["chain"]["head"]
    stats = maof.json("stats")
    assert stats["runs"]["completed"] >= 2 and stats["stages"]["completed"] >= 4
    assert agent["agentId"] in maof.ok("stats").stdout
    assert maof.json("agents", "delete", agent["agentId"]) is not None
    assert maof.json("agents", "list", "--capability", capability)["agents"] == []
    assert maof.json("logout") == {"sessionsEnded": 1}
    assert maof.credentials.load() is None


def test_status_result_and_audit_read_for_a_person(
    maof: Maof, signed_in: str, poller: Any, tmp_path: Path
) -> None:
    capability = unique_capability("cli")
    register_agent(maof, "mock://cli-human", capability)
    run_id = maof.ok("run", str(workflow_file(tmp_path, capability))).stdout.strip()
    assert run_id.startswith("wfr-")
    watched = maof.ok("status", run_id, "--watch")
    assert json.loads(watched.stdout)["capability"] == capability
    status = maof.ok("status", run_id).stdout
    assert run_id in status and "completed" in status and "s1 " in status
    assert json.loads(maof.ok("result", run_id).stdout)["capability"] == capability
    audit = maof.ok("audit", run_id, "--verify")
    assert "chain valid" in audit.stdout and "submit" in audit.stdout
    assert "Verified here:" in audit.stderr and "signed" in audit.stderr
    runs = maof.ok("runs", "--status", "completed").stdout
    assert run_id in runs


def test_audit_verify_refuses_unsigned_entries_unless_allowed(
    maof: Maof, signed_in: str, poller: Any, tmp_path: Path
) -> None:
    capability = unique_capability("cli")
    register_agent(maof, "mock://cli-legacy", capability)
    run_id = maof.ok("run", str(workflow_file(tmp_path, capability)), "--watch", "--json")
    ref = json.loads(run_id.stdout)["workflowRunId"]
    # A trail from before signing: its entries are legacy (version 1), which no key signed.
    rewrite_unsigned(ref, lambda entry: None, logged_at=BEFORE_SIGNING)
    refused = maof("audit", ref, "--verify")
    assert refused.exit_code == 1, refused.output
    assert "legacy (version 1) entries, which no key signed: refused" in refused.stderr
    allowed = maof.ok("audit", ref, "--verify", "--allow-legacy")
    assert "Verified here:" in allowed.stderr and "0 signed" in allowed.stderr


def test_cancel_and_retry_from_the_command_line(
    maof: Maof, signed_in: str, poller: Any, tmp_path: Path, agents: list[ScriptedAgent]
) -> None:
    slow = ScriptedAgent().start()
    agents.append(slow)
    slow.script.append(sleep(3))
    capability = unique_capability("cli-slow")
    register_agent(maof, slow.url, capability)
    path = workflow_file(tmp_path, capability, capability)
    run_id = maof.ok("run", str(path)).stdout.strip()
    wait_until(lambda: maof.json("status", run_id)["stages"][0]["status"] == "in_progress")
    cancelled = maof.ok("cancel", run_id)
    assert f"Cancelled {run_id} (1 stage(s) not started)." in cancelled.stdout  # s2 had not
    assert maof.json("status", run_id)["status"] == "cancelled"
    watched = maof("status", run_id, "--watch")
    assert watched.exit_code == 1 and "was cancelled" in watched.stderr
    again = maof("cancel", run_id)
    assert again.exit_code == 1 and "[CONFLICT]" in again.stderr
    retried = maof("retry", run_id, "--watch")
    assert retried.exit_code == 0, retried.output
    assert "echo" in json.loads(retried.stdout)  # the scripted agent echoes its input
    assert maof.json("status", run_id)["status"] == "completed"
    conflict = maof("retry", run_id, "--json")
    assert conflict.exit_code == 1 and conflict.stdout == ""
    actions = [entry["action"] for entry in maof.json("audit", run_id)["logs"]]
    assert "cancel" in actions and "retry-run" in actions


def test_agents_register_list_and_delete_by_agent_id(maof: Maof, signed_in: str) -> None:
    capability = unique_capability("cli")
    agent_id = f"my-agent-{uuid.uuid4().hex[:6]}"
    registered = maof.ok(
        "agents",
        "register",
        "--agent-id",
        agent_id,
        "--name",
        "Mine",
        "--endpoint",
        "mock://mine",
        "--capability",
        capability,
        "--capability",
        "summarization",
        input="token-from-a-prompt\n",  # --auth-token left out: asked for, hidden
    )
    assert f"Registered {agent_id}" in registered.stdout
    assert "token-from-a-prompt" not in registered.output
    listed = maof.ok("agents", "list", "--capability", capability).stdout
    assert agent_id in listed and "online" in listed
    assert maof.ok("agents", "delete", agent_id).stdout.strip() == f"Deleted {agent_id}."
    missing = maof("agents", "delete", agent_id)
    assert missing.exit_code == 1 and "no agent with agentId" in missing.stderr


def test_an_agent_id_names_your_own_agent_before_a_shared_one(
    maof: Maof, signed_in: str, admin: Api
) -> None:
    """agentIds are per account: a shared agent may carry the id of one of yours."""
    agent_id = f"same-name-{uuid.uuid4().hex[:6]}"
    maof.ok(
        "agents", "register", "--agent-id", agent_id, "--name", "Mine",
        "--endpoint", "mock://mine", "--capability", unique_capability("cli"),
        "--auth-token", "t",
    )  # fmt: skip
    shared = admin.post(
        "/agents/register",
        {
            "agentId": agent_id,
            "name": "Shared",
            "endpoint": "mock://shared",
            "authToken": "t",
            "capabilities": [unique_capability("cli")],
            "visibility": "shared",
        },
    )
    assert shared.status_code == 201, shared.text
    shown = maof.json("agents", "show", agent_id)
    assert shown["name"] == "Mine"
    assert maof.ok("agents", "delete", agent_id).stdout.strip() == f"Deleted {agent_id}."
    # Now only the shared one carries it: shown, but not yours to delete.
    assert maof.json("agents", "show", agent_id)["name"] == "Shared"
    assert admin.delete(f"/agents/{shared.json()['data']['agentUuid']}").status_code == 200


def test_an_agent_id_that_looks_like_a_uuid_names_that_agent(maof: Maof, signed_in: str) -> None:
    """Any 1-255 characters make an agentId: one shaped like a UUID was taken for an
    agentUuid only, so show, check and delete answered 404 for an agent you have."""
    agent_id = str(uuid.uuid4())
    maof.ok(
        "agents", "register", "--agent-id", agent_id, "--name", "Looks like a UUID",
        "--endpoint", "mock://uuid-like", "--capability", unique_capability("cli"),
        "--auth-token", "t",
    )  # fmt: skip
    shown = maof.json("agents", "show", agent_id)
    assert shown["agentId"] == agent_id and shown["agentUuid"] != agent_id
    assert maof.json("agents", "show", shown["agentUuid"])["agentId"] == agent_id  # by UUID
    assert maof.json("agents", "check", agent_id)["status"] == "online"
    assert maof.ok("agents", "delete", agent_id).stdout.strip() == f"Deleted {agent_id}."
    gone = maof("agents", "show", agent_id)
    assert gone.exit_code == 1 and "[NOT_FOUND]" in gone.stderr  # no such UUID nor agentId


def test_a_refused_workflow_exits_1_naming_the_field(
    maof: Maof, signed_in: str, tmp_path: Path
) -> None:
    path = tmp_path / "cycle.json"
    stages = [
        {"id": "a", "name": "A", "agentCapability": "x", "dependencies": ["b"]},
        {"id": "b", "name": "B", "agentCapability": "x", "dependencies": ["a"]},
    ]
    path.write_text(json.dumps({"workflow": {"name": "cycle", "stages": stages}}))
    result = maof("run", str(path))
    assert result.exit_code == 1
    assert "Stages form a cycle" in result.stderr and "[VALIDATION_ERROR]" in result.stderr
    assert "workflow.stages.0.dependencies" in result.stderr


def test_usage_errors_exit_2(maof: Maof, tmp_path: Path) -> None:
    assert maof("run", str(tmp_path / "missing.yaml")).exit_code == 2
    path = workflow_file(tmp_path, "x")
    bad_input = maof("run", str(path), "--input", "plain words")
    assert bad_input.exit_code == 2 and "neither a file nor valid JSON" in bad_input.output
    assert maof("agents", "register", "--agent-id", "a").exit_code == 2
    assert maof("runs", "--status", "sideways").exit_code == 2


def test_an_unreachable_api_is_named(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = Maof(url, tmp_path)("health")
    assert result.exit_code == 1
    assert f"Could not reach the MAOF API at {url}" in result.stderr
    assert "make dev" in result.stderr


def test_the_client_shares_the_cli_session_and_export_audit_is_not_served_yet(
    maof: Maof, signed_in: str
) -> None:
    client = MaofClient(maof.api_url, tokens=maof.credentials)
    assert client.me().email == signed_in
    with pytest.raises(NotFound) as caught:
        client.export_audit("wfr-00000000-0000-0000-0000-000000000000")
    assert caught.value.request_id


# ------------------------------------------------------------------ token refresh


def expired_copy(access_token: str) -> str:
    """The same session's access token, signed the same way, expired a minute ago."""
    claims = jwt.decode(access_token, options={"verify_signature": False})
    principal = Principal(uuid.UUID(claims["sub"]), claims["email"], claims["role"])
    return tokens.issue(
        principal,
        tokens.ACCESS,
        session_id=uuid.UUID(hex=claims["sid"]),
        version=int(claims["ver"]),
        not_after=int(time.time()) - 60,
    )


def test_an_expired_access_token_is_refreshed_without_a_new_login(
    maof: Maof, signed_in: str, api_url: str
) -> None:
    before = maof.stored()
    expired = expired_copy(before.access_token)
    refused = Api(api_url, token=expired).get("/auth/me")
    assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]
    maof.credentials.save(Tokens(expired, before.refresh_token, before.email))

    assert maof.json("whoami")["email"] == signed_in  # no login in between
    after = maof.stored()
    assert after.access_token != expired
    assert after.refresh_token != before.refresh_token  # rotated, and the new one kept
    assert mode(maof.credentials.path) == 0o600

    # An access token the API refuses (401) is refreshed the same way.
    maof.credentials.save(Tokens("not-a-jwt", after.refresh_token, after.email))
    assert maof.json("runs")["runs"] == []
    latest = maof.stored()
    assert latest.refresh_token not in (before.refresh_token, after.refresh_token)

    # Presenting a retired refresh token (a stolen copy) ends the session: the CLI then
    # says to sign in again, and forgets the dead tokens.
    stolen = Api(api_url).post("/auth/refresh", {"refreshToken": before.refresh_token})
    assert stolen.status_code == 401
    maof.credentials.save(Tokens(expired_copy(latest.access_token), latest.refresh_token))
    ended = maof("whoami")
    assert ended.exit_code == 1
    assert "has ended" in ended.stderr and "maof login" in ended.stderr
    assert maof.credentials.load() is None
    maof.ok("login", "--email", signed_in, "--password-stdin", input=PASSWORD)
    assert maof.json("whoami")["email"] == signed_in


# ------------------------------------------------------------------ the installed executable


def test_the_installed_maof_executable_runs_a_workflow_to_its_result(
    api_url: str, poller: Any, tmp_path: Path
) -> None:
    executable = Path(sys.executable).parent / "maof"
    assert executable.exists(), "the maof console script is missing: run `make venv`"
    config = tmp_path / "config"
    env = {
        **os.environ,
        "MAOF_API_URL": api_url,
        "MAOF_CONFIG_DIR": str(config),
        # This checkout's client, whichever checkout the venv's editable install points at.
        "PYTHONPATH": str(PROJECT_DIR),
    }

    def maof(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(executable), *args],
            input=input,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    email = unique_email()
    signed = maof(
        "register", "--email", email, "--name", "Exe", "--password-stdin", "--login", input=PASSWORD
    )
    assert signed.returncode == 0, signed.stderr
    assert mode(config / "credentials.json") == 0o600
    capability = unique_capability("exe")
    registered = maof(
        "agents",
        "register",
        "--agent-id",
        f"exe-{uuid.uuid4().hex[:8]}",
        "--name",
        "Exe agent",
        "--endpoint",
        "mock://exe",
        "--auth-token",
        "t",
        "--capability",
        capability,
    )
    assert registered.returncode == 0, registered.stderr
    path = workflow_file(tmp_path, capability, capability)
    watched = maof("run", str(path), "--input", '{"text": "exe"}', "--watch")
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["capability"] == capability
    assert "completed" in watched.stderr
    runs = json.loads(maof("runs", "--json").stdout)
    assert runs["meta"]["total"] == 1
    failed = maof("run", str(EXAMPLES / "missing-capability.yaml"), "--watch")
    assert failed.returncode == 1 and "stage 'extract'" in failed.stderr


# ------------------------------------------------------------------ what it refuses to send


def crashed(result: Result) -> bool:
    """A traceback (an exception other than click's exit), not a clean `Error:` exit."""
    return result.exception is not None and not isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("url", ["localhost:3000", "api.example.com", "ftp://api.example.com"])
def test_an_api_url_without_http_or_a_host_is_a_usage_error(tmp_path: Path, url: str) -> None:
    from_env = Maof(url, tmp_path)("health")
    from_option = Maof("http://127.0.0.1:3000", tmp_path)("--api-url", url, "health")
    for result in (from_env, from_option):
        assert result.exit_code == 2 and not crashed(result), result.output
        assert "Invalid value for '--api-url'" in result.stderr
        assert f"{url!r} is not an http:// or https:// URL with a host" in result.stderr


def test_a_file_or_input_that_cannot_be_sent_is_a_usage_error(tmp_path: Path) -> None:
    maof = Maof(f"http://127.0.0.1:{free_port()}", tmp_path)  # nothing is sent
    maof.credentials.save(Tokens("a.b", "r", "x@example.com"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(
        "name: café\nstages: [{id: a, name: A, agentCapability: x}]\n".encode("latin-1")
    )
    path = workflow_file(tmp_path, "x")
    latin1_input = tmp_path / "input.json"
    latin1_input.write_bytes(b'{"text": "caf\xe9"}')
    yaml_inf = tmp_path / "in.yaml"
    yaml_inf.write_text("x: .inf\n")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    cases = [
        (["run", str(latin1)], "latin1.yaml is not UTF-8 text"),
        (["run", str(path), "--input", str(latin1_input)], "input.json is not UTF-8 text"),
        (["run", str(path), "--input", '{"x": NaN}'], "--input: x is NaN"),
        (["run", str(path), "--input", str(yaml_inf)], "in.yaml: x is Infinity"),
        (["run", str(deep)], "deep.json nests lists or objects too deeply"),
        (["run", str(path), "--input", "[" * 100_000], "--input nests lists or objects too"),
    ]
    for args, message in cases:
        result = maof(*args)
        assert result.exit_code == 2 and not crashed(result), (args, result.output)
        assert message in result.stderr, result.stderr


def test_inline_json_input_longer_than_a_file_name_is_submitted(
    maof: Maof, signed_in: str, tmp_path: Path
) -> None:
    paragraph = {"text": "A paragraph of input. " * 20}  # 440 characters
    path = workflow_file(tmp_path, unique_capability())
    run_id = maof.ok("run", str(path), "--input", json.dumps(paragraph)).stdout.strip()
    assert maof.json("status", run_id)["input"] == paragraph


# ------------------------------------------------------------------ servers that are not MAOF's


Answer = tuple[int, dict[str, str], bytes]


class FixedAnswers(http.server.BaseHTTPRequestHandler):
    """A server answering fixed (status, headers, body) per path prefix, noting each request
    (a proxy, an older or compromised API, or the host a redirect points at). A list of
    answers is answered in turn, its last one from then on."""

    answers: dict[str, Answer | list[Answer]] = {}
    seen: list[tuple[str, str, bytes]]

    def answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.command, self.path, body))
        found = next(
            (answer for prefix, answer in self.answers.items() if self.path.startswith(prefix)),
            (404, {}, b"{}"),
        )
        if isinstance(found, list):
            found = found.pop(0) if len(found) > 1 else found[0]
        status, headers, payload = found
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = answer

    def log_message(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def fixed_server(
    answers: dict[str, Answer | list[Answer]], port: int = 0
) -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    seen: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (FixedAnswers,), {"answers": answers, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def envelope(data: Any) -> Answer:
    return 200, {}, json.dumps({"success": True, "data": data}).encode()


def test_a_redirect_is_not_followed_and_the_password_goes_nowhere_else(tmp_path: Path) -> None:
    with fixed_server({"/": envelope({})}) as (other_url, other_seen):
        # "localhost" is another host than 127.0.0.1 as far as requests goes.
        location = other_url.replace("127.0.0.1", "localhost") + "/auth/login"
        with fixed_server({"/": (307, {"Location": location}, b"")}) as (front_url, front_seen):
            result = Maof(front_url, tmp_path)(
                "login", "--email", "a@example.com", "--password-stdin", input="s3cret-password"
            )
    assert result.exit_code == 1 and not crashed(result), result.output
    assert f"HTTP 307, a redirect to {location}; not followed" in result.stderr
    assert [(method, path) for method, path, _ in front_seen] == [("POST", "/auth/login")]
    assert other_seen == []


SIGNED_IN = envelope(
    {
        "accessToken": "a.b",
        "refreshToken": "r",
        "user": {"userUuid": "u", "email": "x@example.com", "name": "n", "role": "user"},
    }
)


def test_login_where_tokens_cannot_be_stored_fails_before_sending_the_password(
    tmp_path: Path,
) -> None:
    """MAOF_CONFIG_DIR under a regular file: the sign-in succeeded, opening a session, and
    storing its tokens was a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with fixed_server({"/auth/login": SIGNED_IN}) as (url, seen):
        maof = Maof(url, blocker / "maof")
        login = maof("login", "--email", "x@example.com", "--password-stdin", input=PASSWORD)
        register = maof(
            "register", "--email", "x@example.com", "--name", "n", "--password-stdin", "--login",
            input=PASSWORD,
        )  # fmt: skip
    for result in (login, register):
        assert result.exit_code == 1 and not crashed(result), result.output
        assert f"Error: Cannot store the credentials in {blocker / 'maof'}" in result.stderr
        assert "MAOF_CONFIG_DIR" in result.stderr
    assert seen == []  # no password sent, no session opened


def test_login_with_a_home_it_cannot_write_is_one_error_line(tmp_path: Path) -> None:
    """The installed `maof`, as a user whose HOME is read-only to them (root, whom no mode
    stops, runs it as nobody)."""
    demoted = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    maof = [*(demoted if os.geteuid() == 0 else []), str(Path(sys.executable).parent / "maof")]
    home = Path(tempfile.mkdtemp(prefix="maof-home-"))  # in /tmp, which nobody can reach
    home.chmod(0o555)
    try:
        with fixed_server({"/auth/login": SIGNED_IN}) as (url, seen):
            done = subprocess.run(
                [*maof, "login", "--email", "x@example.com", "--password-stdin"],
                env={
                    "PATH": "/usr/bin:/bin",
                    "HOME": str(home),
                    "MAOF_API_URL": url,
                    "PYTHONPATH": str(PROJECT_DIR),  # this checkout's client
                },
                input=PASSWORD,
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
            )
    finally:
        home.chmod(0o755)
        home.rmdir()
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"Error: Cannot store the credentials in {home}/.config/maof")
    assert "Traceback" not in done.stderr and seen == []


def test_answers_that_are_not_maofs_are_errors_not_tracebacks(tmp_path: Path) -> None:
    answers = {
        "/auth/me": envelope(None),
        "/health": (200, {}, b'{"success": true}'),
        "/workflows": (302, {"Location": "/workflows"}, b""),  # a proxy's redirect loop
        "/stats": envelope({"runs": {}}),
    }
    with fixed_server(answers) as (url, seen):
        maof = Maof(url, tmp_path)
        maof.credentials.save(Tokens("a.b", "r", "x@example.com"))
        commands = [("whoami",), ("health",), ("runs",), ("stats",)]
        results = {args: maof(*args) for args in commands}
    for args, result in results.items():
        assert result.exit_code == 1 and not crashed(result), (args, result.output)
        assert "[UNEXPECTED_RESPONSE]" in result.stderr, result.stderr
    assert "redirect to /workflows" in results[("runs",)].stderr
    assert [path for _, path, _ in seen].count("/workflows") == 1  # not followed


def test_agents_show_prints_no_escape_codes_it_receives(tmp_path: Path) -> None:
    hostile = "evil\x1b]0;owned-title\x1b\\\x1b[2J\x1b[31mred\x9b2J\u202eexe"
    agent_uuid = str(uuid.uuid4())
    agent = {
        "agentUuid": agent_uuid,
        "agentId": "a",
        "name": hostile,
        "description": hostile,
        "capabilities": [hostile, "x"],
        f"extra{hostile}": hostile,
        "status": "online",
    }
    with fixed_server({f"/agents/{agent_uuid}": envelope(agent)}) as (url, _):
        maof = Maof(url, tmp_path)
        maof.credentials.save(Tokens("a.b", "r", "x@example.com"))
        shown = maof.ok("agents", "show", agent_uuid)
        as_json = maof.json("agents", "show", agent_uuid)
    assert "owned-title" in shown.stdout and "red" in shown.stdout  # every field is there
    assert not any(char in shown.stdout for char in "\x1b\x9b\u202e")
    assert as_json == agent  # --json: the same data, escaped


# ------------------------------------------------------------------ watching through an outage

RUN_ID = "wfr-00000000-0000-4000-8000-000000000001"


def run_answer(status: str) -> Answer:
    stage = {"stageId": "a", "name": "A", "attempt": 1}
    stage["status"] = "completed" if status == "completed" else "in_progress"
    return envelope(
        {"workflowRunId": RUN_ID, "workflowName": "p", "status": status, "stages": [stage]}
    )


RESULT = {f"/workflows/{RUN_ID}/result": envelope({"workflowRunId": RUN_ID, "output": 1})}


@pytest.mark.parametrize(
    "blip",
    [
        (502, {"Content-Type": "text/html"}, b"<html>502 Bad Gateway</html>"),
        (
            503,
            {"Retry-After": "1"},
            json.dumps(
                {"success": False, "error": {"code": "SERVICE_UNAVAILABLE", "message": "away"}}
            ).encode(),
        ),
    ],
    ids=["proxy-502", "api-503"],
)
def test_watch_goes_on_after_a_poll_fails_while_the_run_does(tmp_path: Path, blip: Answer) -> None:
    polls = [run_answer("in_progress"), blip, run_answer("completed")]
    with fixed_server({**RESULT, f"/workflows/{RUN_ID}": polls}) as (url, _):
        maof = Maof(url, tmp_path)
        maof.credentials.save(Tokens("a.b", "r", "x@example.com"))
        result = maof("status", RUN_ID, "--watch")
    assert result.exit_code == 0, result.output
    assert "Reconnecting in 1 s" in result.stderr
    assert json.loads(result.stdout) == 1


def test_watch_reconnects_to_an_api_that_restarts(tmp_path: Path) -> None:
    port = free_port()
    maof = Maof(f"http://127.0.0.1:{port}", tmp_path)
    maof.credentials.save(Tokens("a.b", "r", "x@example.com"))
    outcome: dict[str, Result] = {}
    watcher = threading.Thread(
        target=lambda: outcome.update(watched=maof("status", RUN_ID, "--watch"))
    )
    with fixed_server({f"/workflows/{RUN_ID}": run_answer("in_progress")}, port) as (_, seen):
        watcher.start()
        wait_until(lambda: len(seen) >= 2)
    time.sleep(1.5)  # the API is away this long: the watch's polls are refused meanwhile
    with fixed_server({**RESULT, f"/workflows/{RUN_ID}": run_answer("completed")}, port):
        watcher.join(30)
    watched = outcome["watched"]
    assert watched.exit_code == 0, watched.output
    assert "Reconnecting in 1 s… (Could not reach the MAOF API" in watched.stderr
