"""`chalice package` of the prod stage, merged with infra/template.json, is a deployable template.

Chalice builds the Lambda zip (manylinux wheels from PyPI) and the SAM template; the merge
template adds the stage queue and its dead-letter queue, turns on partial batch failures for
the `run_stage` SQS trigger and makes API Gateway's own errors answer with our JSON envelope.
Packaging takes about 10 s when requirements.txt, app.py or chalicelib changed (Chalice keeps
the built zip in .chalice/deployments, keyed by their hash) and about 1 s otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROJECT_DIR = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent
DEPLOYMENTS_DIR = PROJECT_DIR / ".chalice" / "deployments"
# chalicelib.engine.handlers.STAGE_QUEUE_NAME when MAOF_STAGE_QUEUE_NAME is unset, as here.
STAGE_QUEUE_NAME = "maof-stage-queue"
# What `make package` sets. No MAOF_* settings: importing the app must not need any (the
# prod stage reads its secrets when it runs, never at packaging time).
PACKAGE_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
}


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of `chalice package --stage prod --merge-template infra/template.json`."""
    out = tmp_path_factory.mktemp("package") / "build"
    # The test settings (tests/conftest.py) name a test queue: none of them may leak in.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAOF_")}
    env.pop("AWS_PROFILE", None)
    env.update(PACKAGE_ENV)
    command = [
        str(BIN_DIR / "chalice"),
        "package",
        "--stage",
        "prod",
        "--merge-template",
        "infra/template.json",
        str(out),
    ]
    result = subprocess.run(
        command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=540
    )
    assert result.returncode == 0, f"chalice package failed:\n{result.stdout}\n{result.stderr}"
    _prune_stale_deployment_zips()
    return out


def _prune_stale_deployment_zips() -> None:
    """Keep only the newest dependency zip Chalice cached, so each code change run here
    does not leave another ~18 MB file behind."""
    zips = sorted(DEPLOYMENTS_DIR.glob("*.zip"), key=lambda path: path.stat().st_mtime)
    for stale in zips[:-1]:
        stale.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def template(package_dir: Path) -> dict[str, Any]:
    return json.loads((package_dir / "sam.json").read_text())


@pytest.fixture(scope="module")
def resources(template: dict[str, Any]) -> dict[str, Any]:
    return template["Resources"]


def _sqs_event(resources: dict[str, Any]) -> dict[str, Any]:
    events = resources["RunStage"]["Properties"]["Events"]
    sqs = [event for event in events.values() if event["Type"] == "SQS"]
    assert len(sqs) == 1, events
    return sqs[0]


def _render(template: str, message: str = '"An error"') -> Any:
    """What API Gateway renders from a gateway response's mapping template, parsed."""
    rendered = template.replace("$context.error.messageString", message).replace(
        "$context.requestId", "req-1"
    )
    return json.loads(rendered)


def test_package_holds_the_code_and_the_sam_template(
    package_dir: Path, template: dict[str, Any]
) -> None:
    assert (package_dir / "deployment.zip").stat().st_size > 0
    assert template["Transform"] == "AWS::Serverless-2016-10-31"


def test_template_holds_the_api_and_its_handler(resources: dict[str, Any]) -> None:
    api = resources["RestAPI"]
    assert api["Type"] == "AWS::Serverless::Api"
    assert "/health" in api["Properties"]["DefinitionBody"]["paths"]
    handler = resources["APIHandler"]
    assert handler["Type"] == "AWS::Serverless::Function"
    assert handler["Properties"]["Handler"] == "app.app"


def test_run_stage_reports_batch_item_failures(resources: dict[str, Any]) -> None:
    run_stage = resources["RunStage"]
    assert run_stage["Type"] == "AWS::Serverless::Function"
    assert run_stage["Properties"]["Handler"] == "app.run_stage"
    event = _sqs_event(resources)["Properties"]
    assert event["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert event["BatchSize"] == 10
    queue_arn = event["Queue"]["Fn::Sub"]
    assert queue_arn.endswith(f":{STAGE_QUEUE_NAME}"), queue_arn
    # Chalice names the queue by ARN, not by Ref: the mapping must wait for the queue.
    assert "StageQueue" in run_stage["DependsOn"]


def test_stage_queue_redrives_to_its_dead_letter_queue(resources: dict[str, Any]) -> None:
    queue = resources["StageQueue"]
    assert queue["Type"] == "AWS::SQS::Queue"
    assert queue["Properties"]["QueueName"] == STAGE_QUEUE_NAME
    redrive = queue["Properties"]["RedrivePolicy"]
    assert redrive["maxReceiveCount"] == 5
    dlq_id, attribute = redrive["deadLetterTargetArn"]["Fn::GetAtt"]
    assert attribute == "Arn"
    dlq = resources[dlq_id]
    assert dlq["Type"] == "AWS::SQS::Queue"
    assert dlq["Properties"]["QueueName"] == f"{STAGE_QUEUE_NAME}-dlq"


def test_stage_queue_hides_a_message_for_six_function_timeouts(resources: dict[str, Any]) -> None:
    timeout = resources["RunStage"]["Properties"]["Timeout"]
    assert timeout == 60
    visibility = resources["StageQueue"]["Properties"]["VisibilityTimeout"]
    assert visibility >= 6 * timeout


def test_unknown_route_answers_json_404(resources: dict[str, Any]) -> None:
    responses = resources["RestAPI"]["Properties"]["GatewayResponses"]
    missing = responses["MISSING_AUTHENTICATION_TOKEN"]
    assert missing["StatusCode"] == "404"
    assert missing["ResponseParameters"]["Headers"]["Access-Control-Allow-Origin"] == "'*'"
    body = _render(missing["ResponseTemplates"]["application/json"])
    assert body["success"] is False
    assert body["error"]["code"] == "NOT_FOUND"
    assert body["error"]["message"]
    assert body["error"]["requestId"] == "req-1"


@pytest.mark.parametrize(
    ("response_type", "code"),
    [
        ("DEFAULT_4XX", "BAD_REQUEST"),
        ("DEFAULT_5XX", "INTERNAL_ERROR"),
        ("THROTTLED", "RATE_LIMITED"),
        ("REQUEST_TOO_LARGE", "PAYLOAD_TOO_LARGE"),
    ],
)
def test_gateway_errors_answer_with_the_envelope(
    resources: dict[str, Any], response_type: str, code: str
) -> None:
    response = resources["RestAPI"]["Properties"]["GatewayResponses"][response_type]
    assert response["ResponseParameters"]["Headers"]["Access-Control-Allow-Origin"] == "'*'"
    body = _render(response["ResponseTemplates"]["application/json"], '"Too \\"many\\""')
    assert body == {
        "success": False,
        "error": {"code": code, "message": 'Too "many"', "requestId": "req-1"},
    }


def test_secrets_stay_out_of_the_template(template: dict[str, Any]) -> None:
    secret_names = {"MAOF_JWT_SECRET", "MAOF_SECRET_KEY", "MAOF_DATABASE_URL", "MAOF_REDIS_URL"}
    for name, resource in template["Resources"].items():
        variables = resource.get("Properties", {}).get("Environment", {}).get("Variables", {})
        assert not secret_names & set(variables), name
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert shared["MAOF_SECRETS_SSM_PATH"] == {"Ref": "SecretsParameterPath"}
    assert template["Parameters"]["SecretsParameterPath"]["Type"] == "String"


def test_cfn_lint_passes(package_dir: Path) -> None:
    result = subprocess.run(
        [str(BIN_DIR / "cfn-lint"), str(package_dir / "sam.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
