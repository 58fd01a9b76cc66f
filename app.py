"""MAOF on AWS Lambda: every route, queue and schedule, each one line into chalicelib."""

from typing import Any

from chalice.app import CloudWatchEvent, Rate, SQSEvent

from chalicelib.agents import registry as agents
from chalicelib.auth import service as auth
from chalicelib.engine import handlers as engine
from chalicelib.http import ApiRequest, MaofApp, Reply
from chalicelib.workflows import runs
from chalicelib.workflows.definition import ExecuteRequest

app = MaofApp(app_name="maof")


# ------------------------------------------------------------------ health


@app.endpoint("/health", "GET", public=True)
def health(request: ApiRequest) -> Reply:
    from chalicelib import health

    return health.check()


# ------------------------------------------------------------------ auth


@app.endpoint("/auth/register", "POST", public=True)
def register(request: ApiRequest) -> Reply:
    return Reply(auth.register(request.body(auth.RegisterRequest)), 201)


@app.endpoint("/auth/login", "POST", public=True)
def login(request: ApiRequest) -> dict[str, Any]:
    return auth.login(request.body(auth.LoginRequest))


@app.endpoint("/auth/refresh", "POST", public=True)
def refresh(request: ApiRequest) -> dict[str, Any]:
    return auth.refresh(request.body(auth.RefreshRequest))


@app.endpoint("/auth/me", "GET")
def me(request: ApiRequest) -> dict[str, Any]:
    return auth.me(request.user)


# ------------------------------------------------------------------ agents


@app.endpoint("/agents/register", "POST")
def register_agent(request: ApiRequest) -> Reply:
    return Reply(agents.register(request.user, request.body(agents.RegisterAgentRequest)), 201)


@app.endpoint("/agents", "GET")
def list_agents(request: ApiRequest) -> dict[str, Any]:
    return agents.list_agents(request.query(agents.AgentQuery))


@app.endpoint("/agents/{agent_uuid}", "GET")
def get_agent(request: ApiRequest, agent_uuid: str) -> dict[str, Any]:
    return agents.get_agent(agent_uuid)


@app.endpoint("/agents/{agent_uuid}/health-check", "POST")
def health_check_agent(request: ApiRequest, agent_uuid: str) -> dict[str, Any]:
    return agents.check_health(agent_uuid)


@app.endpoint("/agents/{agent_uuid}", "DELETE")
def delete_agent(request: ApiRequest, agent_uuid: str) -> dict[str, Any]:
    return agents.delete_agent(request.user, agent_uuid)


# ------------------------------------------------------------------ workflows


@app.endpoint("/workflows/execute", "POST")
def execute_workflow(request: ApiRequest) -> Reply:
    return runs.submit(request.user, request.body(ExecuteRequest))


@app.endpoint("/workflows", "GET")
def list_runs(request: ApiRequest) -> dict[str, Any]:
    return runs.list_runs(request.user, request.query(runs.RunQuery))


@app.endpoint("/workflows/{run_id}", "GET")
def get_run(request: ApiRequest, run_id: str) -> dict[str, Any]:
    return runs.get_run(request.user, run_id)


@app.endpoint("/workflows/{run_id}/result", "GET")
def get_result(request: ApiRequest, run_id: str) -> dict[str, Any]:
    return runs.get_result(request.user, run_id)


@app.endpoint("/workflows/{run_id}/audit", "GET")
def get_audit(request: ApiRequest, run_id: str) -> dict[str, Any]:
    return runs.get_audit(request.user, run_id)


# ------------------------------------------------------------------ engine


@app.on_sqs_message(queue=engine.STAGE_QUEUE_NAME, batch_size=10)
def run_stage(event: SQSEvent) -> dict[str, Any]:
    return engine.run_stage_batch([record.to_dict() for record in event])


@app.schedule(Rate(1, unit=Rate.MINUTES))
def sweep_stalled_stages(event: CloudWatchEvent) -> dict[str, Any]:
    return engine.sweep_stalled_stages()


@app.schedule(Rate(1, unit=Rate.MINUTES))
def check_agent_health(event: CloudWatchEvent) -> dict[str, Any]:
    return engine.check_agent_health()


# ------------------------------------------------------------------ deploy


@app.lambda_function(name="migrate")
def migrate(event: dict[str, Any], context: Any) -> dict[str, Any]:
    from chalicelib.db import migrate as migrations

    return migrations.handler(event)
