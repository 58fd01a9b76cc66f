"""MAOF on AWS Lambda: every route, queue and schedule, each one line into chalicelib."""

from typing import Any

from chalice.app import CloudWatchEvent, Rate, SQSEvent

from chalicelib import health as service_health
from chalicelib import openapi as openapi_document
from chalicelib.agents import registry as agents
from chalicelib.auth import service as auth
from chalicelib.core import responses
from chalicelib.core.api import Reply
from chalicelib.engine import handlers as engine
from chalicelib.http import ApiRequest, MaofApp
from chalicelib.workflows import audit_trail, control, runs, stats
from chalicelib.workflows.definition import ExecuteRequest

app = MaofApp(app_name="maof")


# ------------------------------------------------------------------ health and docs


@app.endpoint(
    "/health",
    "GET",
    public=True,
    response=responses.Health,
    error_bodies={503: responses.HealthDegraded},
    summary="Database, Redis and queue status",
)
def health(request: ApiRequest) -> Reply:
    return service_health.check()


@app.endpoint(
    "/openapi",
    "GET",
    public=True,
    raw=True,
    response=responses.OpenApiDocument,
    summary="This API's OpenAPI document",
)
def openapi(request: ApiRequest) -> dict[str, Any]:
    return openapi_document.document(app.endpoints)


# ------------------------------------------------------------------ auth


@app.endpoint(
    "/auth/register",
    "POST",
    public=True,
    body=auth.RegisterRequest,
    status=201,
    response=responses.User,
    raises=(409, 429),
    summary="Create an account",
)
def register(request: ApiRequest, body: auth.RegisterRequest) -> responses.User:
    return auth.register(body, request.source_ip)


@app.endpoint(
    "/auth/login",
    "POST",
    public=True,
    body=auth.LoginRequest,
    response=responses.SignedIn,
    raises=(401, 429),
    summary="Get tokens",
)
def login(request: ApiRequest, body: auth.LoginRequest) -> responses.SignedIn:
    return auth.login(body, request.source_ip)


@app.endpoint(
    "/auth/refresh",
    "POST",
    public=True,
    body=auth.RefreshRequest,
    response=responses.SignedIn,
    raises=(401,),
    summary="New tokens for a refresh token",
)
def refresh(request: ApiRequest, body: auth.RefreshRequest) -> responses.SignedIn:
    return auth.refresh(body)


@app.endpoint(
    "/auth/logout",
    "POST",
    public=True,
    body=auth.RefreshRequest,
    response=responses.SessionsEnded,
    summary="Sign out: end the session of a refresh token",
)
def logout(request: ApiRequest, body: auth.RefreshRequest) -> responses.SessionsEnded:
    return auth.logout(body)


@app.endpoint(
    "/auth/logout-all",
    "POST",
    response=responses.SessionsEnded,
    summary="Sign out everywhere: end every session",
)
def logout_all(request: ApiRequest) -> responses.SessionsEnded:
    return auth.logout_all(request.user)


@app.endpoint(
    "/auth/password",
    "POST",
    body=auth.PasswordChangeRequest,
    response=responses.SignedIn,
    raises=(429,),
    summary="Change the password (ends every other session)",
)
def change_password(request: ApiRequest, body: auth.PasswordChangeRequest) -> responses.SignedIn:
    return auth.change_password(request.user, body)


@app.endpoint("/auth/me", "GET", response=responses.User, summary="The signed-in user")
def me(request: ApiRequest) -> responses.User:
    return auth.me(request.user)


# ------------------------------------------------------------------ agents


@app.endpoint(
    "/agents/register",
    "POST",
    body=agents.RegisterAgentRequest,
    status=201,
    response=responses.Agent,
    raises=(403, 409, 429),
    summary="Register an agent (its health is checked at once)",
)
def register_agent(request: ApiRequest, body: agents.RegisterAgentRequest) -> responses.Agent:
    return agents.register(request.user, body, available=engine.wake_waiting_for)


@app.endpoint(
    "/agents",
    "GET",
    query=agents.AgentQuery,
    response=responses.AgentList,
    summary="Your agents and shared ones",
)
def list_agents(request: ApiRequest, query: agents.AgentQuery) -> responses.AgentList:
    return agents.list_agents(request.user, query)


@app.endpoint("/agents/{agent_uuid}", "GET", response=responses.Agent, summary="One agent")
def get_agent(request: ApiRequest, agent_uuid: str) -> responses.Agent:
    return agents.get_agent(request.user, agent_uuid)


@app.endpoint(
    "/agents/{agent_uuid}",
    "PATCH",
    body=agents.UpdateAgentRequest,
    response=responses.Agent,
    raises=(403,),
    summary="Change an agent's visibility (owner only; sharing needs an admin)",
)
def update_agent(
    request: ApiRequest, agent_uuid: str, body: agents.UpdateAgentRequest
) -> responses.Agent:
    return agents.update_agent(request.user, agent_uuid, body, available=engine.wake_waiting_for)


@app.endpoint(
    "/agents/{agent_uuid}/health-check",
    "POST",
    response=responses.Agent,
    raises=(403, 429),
    summary="Check an agent's health now",
)
def health_check_agent(request: ApiRequest, agent_uuid: str) -> responses.Agent:
    return agents.check_health(request.user, agent_uuid, available=engine.wake_waiting_for)


@app.endpoint(
    "/agents/{agent_uuid}",
    "DELETE",
    response=responses.AgentDeleted,
    raises=(403,),
    summary="Delete an agent (owner only)",
)
def delete_agent(request: ApiRequest, agent_uuid: str) -> responses.AgentDeleted:
    return agents.delete_agent(request.user, agent_uuid)


# ------------------------------------------------------------------ workflows


@app.endpoint(
    "/workflows/execute",
    "POST",
    body=ExecuteRequest,
    admission=lambda request: runs.admitted(request.user, request.header("Idempotency-Key")),
    status=202,
    response=responses.Submitted,
    raises=(409, 429),
    summary="Submit a workflow",
    headers={"Idempotency-Key": "Per user, kept 24 h: the same key and body give the same run"},
)
def execute_workflow(request: ApiRequest, body: ExecuteRequest) -> Reply:
    return runs.submit(request.user, body, runs.idempotency_key(request.header("Idempotency-Key")))


@app.endpoint(
    "/workflows",
    "GET",
    query=runs.RunQuery,
    response=responses.RunList,
    summary="Your runs, newest first",
)
def list_runs(request: ApiRequest, query: runs.RunQuery) -> responses.RunList:
    return runs.list_runs(request.user, query)


@app.endpoint(
    "/workflows/{run_id}",
    "GET",
    response=responses.Run,
    summary="A run's status, progress and stages",
)
def get_run(request: ApiRequest, run_id: str) -> responses.Run:
    return runs.get_run(request.user, run_id)


@app.endpoint(
    "/workflows/{run_id}/result",
    "GET",
    response=responses.RunResult,
    summary="A completed run's output",
)
def get_result(request: ApiRequest, run_id: str) -> responses.RunResult:
    return runs.get_result(request.user, run_id)


@app.endpoint(
    "/workflows/{run_id}/cancel",
    "POST",
    status=202,
    response=responses.Cancelled,
    raises=(409,),
    summary="Cancel a queued or running run",
)
def cancel_run(request: ApiRequest, run_id: str) -> Reply:
    return control.cancel(request.user, run_id)


@app.endpoint(
    "/workflows/{run_id}/retry",
    "POST",
    status=202,
    response=responses.Retried,
    raises=(409, 429),
    summary="Run a failed or cancelled run again from where it stopped",
)
def retry_run(request: ApiRequest, run_id: str) -> Reply:
    return control.retry(request.user, run_id)


@app.endpoint(
    "/workflows/{run_id}/audit",
    "GET",
    response=responses.AuditTrail,
    summary="A run's audit trail and its chain",
)
def get_audit(request: ApiRequest, run_id: str) -> responses.AuditTrail:
    return audit_trail.get_audit(request.user, run_id)


@app.endpoint(
    "/workflows/{run_id}/audit/export",
    "GET",
    response=responses.AuditBundle,
    summary="A run's audit bundle: entries, keys, outputs, checkpoints (for maof-verify)",
)
def export_audit(request: ApiRequest, run_id: str) -> responses.AuditBundle:
    return audit_trail.export(request.user, run_id)


@app.endpoint(
    "/audit/keys",
    "GET",
    public=True,
    response=responses.PublicKeys,
    summary="The public keys that sign the audit",
)
def audit_keys(request: ApiRequest) -> responses.PublicKeys:
    return audit_trail.public_keys()


@app.endpoint(
    "/audit/checkpoints/latest",
    "GET",
    public=True,
    response=responses.LatestCheckpoint,
    raises=(404,),
    summary="The newest signed audit checkpoint",
)
def latest_checkpoint(request: ApiRequest) -> responses.LatestCheckpoint:
    return audit_trail.latest_checkpoint()


@app.endpoint(
    "/stats",
    "GET",
    response=responses.Stats,
    summary="Your runs, stages and agents over the last hour",
)
def run_stats(request: ApiRequest) -> responses.Stats:
    return stats.stats(request.user)


# ------------------------------------------------------------------ engine


@app.on_sqs_message(queue=engine.STAGE_QUEUE_NAME, batch_size=10)
def run_stage(event: SQSEvent) -> dict[str, Any]:
    return engine.run_stage_batch([record.to_dict() for record in event], event.context)


@app.schedule(Rate(1, unit=Rate.MINUTES))
def sweep_stalled_stages(event: CloudWatchEvent) -> dict[str, Any]:
    return engine.sweep_stalled_stages(event.context)


@app.schedule(Rate(engine.CHECKPOINT_RATE_MINUTES, unit=Rate.MINUTES))
def write_audit_checkpoint(event: CloudWatchEvent) -> dict[str, Any]:
    return engine.write_audit_checkpoint()


@app.schedule(Rate(engine.HEALTH_CHECK_RATE_MINUTES, unit=Rate.MINUTES))
def check_agent_health(event: CloudWatchEvent) -> dict[str, Any]:
    return engine.check_agent_health()


# ------------------------------------------------------------------ deploy


@app.lambda_function(name="migrate")
def migrate(event: dict[str, Any], context: Any) -> dict[str, Any]:
    from chalicelib import maintenance  # Alembic: no other function pays for its import

    return maintenance.handler(event)
