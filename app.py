"""MAOF on AWS Lambda: every route, queue and schedule, each one line into chalicelib."""

from typing import Any

from chalice.app import CloudWatchEvent, Rate, SQSEvent

from chalicelib.auth import service as auth
from chalicelib.engine import handlers as engine
from chalicelib.http import ApiRequest, MaofApp, Reply

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


# ------------------------------------------------------------------ engine


@app.on_sqs_message(queue=engine.STAGE_QUEUE_NAME, batch_size=10)
def run_stage(event: SQSEvent) -> dict[str, Any]:
    return engine.run_stage_batch([record.to_dict() for record in event])


@app.schedule(Rate(1, unit=Rate.MINUTES))
def sweep_stalled_stages(event: CloudWatchEvent) -> dict[str, Any]:
    return engine.sweep_stalled_stages()
