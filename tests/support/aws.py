"""Stand-ins for AWS services that LocalStack does not run here (Lambda, CloudFront): real
boto3 clients whose calls are answered in this process.

Every client a session makes after `answer_calls` sends its requests through botocore as
usual (parameters validated against the service's API model, waiters and paginators work)
up to the moment of sending; then `respond(operation, params)` answers instead of AWS. A
response {"Error": {"Code": …, "Message": …}} is raised as a ClientError.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.awsrequest import AWSResponse

from infra.deploy import Stage

Respond = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass
class Calls:
    """What the stand-in was asked, in order: (operation, parameters)."""

    made: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _pending: threading.local = field(default_factory=threading.local)

    def of(self, operation: str) -> list[dict[str, Any]]:
        return [params for name, params in self.made if name == operation]


def answer_calls(events: Any, service: str, respond: Respond) -> Calls:
    """Answer `service`'s calls of clients made with `events` (a boto3 Session's `events`,
    or a client's `meta.events`)."""
    calls = Calls()

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        calls._pending.call = (model.name, dict(params))

    def reply(model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        name, params = calls._pending.call
        calls.made.append((name, params))
        answer = respond(name, params)
        status = 400 if "Error" in answer else 200
        return AWSResponse("https://stand-in", status, {}, None), answer

    events.register(f"before-parameter-build.{service}.*", record)
    events.register(f"before-call.{service}.*", reply)
    return calls


def offline_stage(**answers: Any) -> Stage:
    """A stage whose CloudFormation and Lambda calls get `answers[operation]` (a dict, or a
    function of the call's parameters)."""
    session = boto3.session.Session(
        region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="y"
    )

    def respond(operation: str, params: dict[str, Any]) -> dict[str, Any]:
        answer = answers[operation]
        return answer(params) if callable(answer) else answer

    for service in ("cloudformation", "lambda"):
        answer_calls(session.events, service, respond)
    return Stage(session, "prod", "/maof/prod")
