"""infra/deploy.py where AWS would say no: the refusals and failure reports that the
LocalStack run (test_infra_localstack.py) cannot provoke, and the Makefile's mapping of its
variables onto the stack's parameters, what the deploy says of /health, and the credentials
LocalStack is sent. No AWS service is called here: AWS's answers come from
tests/support/aws.py."""

from __future__ import annotations

import io
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from infra import DeployError, aws
from infra.deploy import check_health, deploy
from tests.support.aws import offline_stage

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parents[2]


def test_subnets_and_security_groups_go_together() -> None:
    with pytest.raises(DeployError, match="SUBNET_IDS and SECURITY_GROUP_IDS together"):
        deploy(offline_stage(), ["SubnetIds=subnet-1"])
    with pytest.raises(DeployError, match="SUBNET_IDS and SECURITY_GROUP_IDS together"):
        deploy(offline_stage(), ["SecurityGroupIds=sg-1", "AlarmEmail=ops@example.com"])


def test_no_package_no_deploy(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="run `make package`"):
        deploy(offline_stage(), [], package_dir=tmp_path)


def test_make_deploy_hands_its_variables_to_the_stack_as_parameters() -> None:
    variables = {
        "STAGE": "dev",
        "SUBNET_IDS": "subnet-1,subnet-2",
        "SECURITY_GROUP_IDS": "sg-1",
        "ALARM_EMAIL": "ops@example.com",
        "CORS_ORIGIN": "https://maof.example.com",
        "LOG_RETENTION_DAYS": "14",
        "AUDIT_BUCKET": "maof-dev-auditbucket-1a2b3c",
        "API_RATE_LIMIT": "20",
        "API_BURST_LIMIT": "40",
        "RUN_STAGE_MAX_CONCURRENCY": "4",
        "API_RESERVED_CONCURRENCY": "3",
        "RUN_MAX_OUTPUT_BYTES": "2000000",
        "REGION": "eu-west-1",
    }
    dry_run = subprocess.run(
        ["make", "-n", "deploy", *(f"{k}={v}" for k, v in variables.items())],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    [command] = [line for line in dry_run.stdout.splitlines() if "-m infra" in line]
    assert command.split("-m infra", 1)[1].split() == [
        "--stage",
        "dev",
        "--region",
        "eu-west-1",
        "deploy",
        "SubnetIds=subnet-1,subnet-2",
        "SecurityGroupIds=sg-1",
        "AlarmEmail=ops@example.com",
        "CorsOrigin=https://maof.example.com",
        "LogRetentionDays=14",
        "ExistingAuditBucketName=maof-dev-auditbucket-1a2b3c",
        "ApiThrottlingRateLimit=20",
        "ApiThrottlingBurstLimit=40",
        "RunStageMaxConcurrency=4",
        "ApiReservedConcurrency=3",
        "RunMaxOutputBytes=2000000",
    ]
    # The package is made first, for the same stage, without the local MAOF_* settings.
    package = [line for line in dry_run.stdout.splitlines() if "chalice package" in line]
    assert package and "--stage dev --merge-template infra/template.json" in package[0]


OUTPUTS = {
    "Stacks": [
        {
            "StackName": "maof-prod",
            "StackStatus": "CREATE_COMPLETE",
            "CreationTime": "2026-03-01T10:00:00Z",
            "Outputs": [{"OutputKey": "MigrateFunctionName", "OutputValue": "maof-prod-Migrate"}],
        }
    ]
}
READY = {"State": "Active", "LastUpdateStatus": "Successful"}


def failed_invocation(params: dict[str, Any]) -> dict[str, Any]:
    body = {
        "errorType": "ConfigError",
        "errorMessage": "SSM parameter /maof/prod/jwt-secret is missing",
        "stackTrace": ["…"],
    }
    return {
        "StatusCode": 200,
        "FunctionError": "Unhandled",
        "Payload": io.BytesIO(json.dumps(body).encode()),
    }


def test_a_failed_migration_stops_the_deploy_with_its_error() -> None:
    stage = offline_stage(
        DescribeStacks=OUTPUTS, GetFunctionConfiguration=READY, Invoke=failed_invocation
    )
    with pytest.raises(DeployError) as caught:
        stage.migrate()
    message = str(caught.value)
    assert "(ConfigError): SSM parameter /maof/prod/jwt-secret is missing" in message
    assert "/aws/lambda/maof-prod-migrate" in message
    assert "\n" not in message


def test_a_function_that_cannot_start_is_reported() -> None:
    stuck = {"State": "Failed", "StateReason": "The provided subnets have no free IP addresses"}
    stage = offline_stage(DescribeStacks=OUTPUTS, GetFunctionConfiguration=stuck)
    with pytest.raises(
        DeployError, match="maof-prod-Migrate failed to start: The provided subnets"
    ):
        stage.migrate()


def test_a_failed_stack_names_the_resource_and_the_reason() -> None:
    events = [  # newest first, as CloudFormation lists them
        ("maof-prod", "ROLLBACK_COMPLETE", None),
        ("DashboardBucketPolicy", "CREATE_FAILED", "Access Denied (Service: S3,\n Status 403)"),
        ("AlarmTopic", "CREATE_FAILED", "Resource creation cancelled"),
        ("maof-prod", "CREATE_IN_PROGRESS", "User Initiated"),
        ("StageQueue", "CREATE_FAILED", "an older operation's failure"),
    ]
    answer = {
        "StackEvents": [
            {
                "StackId": "arn",
                "EventId": str(number),
                "StackName": "maof-prod",
                "LogicalResourceId": resource,
                "ResourceStatus": status,
                "Timestamp": "2026-03-01T10:00:00Z",
                **({"ResourceStatusReason": reason} if reason else {}),
            }
            for number, (resource, status, reason) in enumerate(events)
        ]
    }
    assert offline_stage(DescribeStackEvents=answer).failures() == [
        "AlarmTopic: Resource creation cancelled",
        "DashboardBucketPolicy: Access Denied (Service: S3, Status 403)",
    ]


def test_a_stack_that_does_not_exist_is_none() -> None:
    missing = {
        "Error": {"Code": "ValidationError", "Message": "Stack with id maof-prod does not exist"}
    }
    assert offline_stage(DescribeStacks=missing).status() is None
    denied = {"Error": {"Code": "AccessDenied", "Message": "not allowed"}}
    with pytest.raises(ClientError, match="AccessDenied"):
        offline_stage(DescribeStacks=denied).status()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            503,
            b'{"data": {"status": "degraded", "services": {"redis": "down"}}}',
            "degraded (redis down)",
        ),
        (200, b"<html>a proxy's page</html>", 'unexpected answer "<html>a proxy\'s page</html>"'),
    ],
)
def test_health_says_what_the_api_answered(status: int, body: bytes, expected: str) -> None:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert check_health(f"http://127.0.0.1:{server.server_port}") == expected
    finally:
        server.shutdown()
        server.server_close()
    assert check_health(f"http://127.0.0.1:{server.server_port}").startswith("no answer (")


def test_localstack_gets_dummy_credentials_never_the_shells(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREALKEYOFTHEUSER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "real-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "real-token")
    monkeypatch.setenv("AWS_PROFILE", "a-profile-this-machine-does-not-have")
    aws("configure", "list", region="us-east-1", endpoint="http://127.0.0.1:4566", quiet=False)
    listed = capfd.readouterr().out
    assert "****************test" in listed and "USER" not in listed


@pytest.mark.parametrize(
    ("health", "status"),
    [("ok (database connected)", 0), ("degraded (redis down)", 1), ("no answer (timed out)", 1)],
)
def test_make_deploy_fails_when_the_deployed_api_is_not_healthy(
    health: str, status: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stack is deployed either way (its URLs printed); a health check that is not `ok`
    exits 1, so a pipeline running `make deploy` notices (it exited 0 and said so in a line)."""
    from infra import __main__ as cli
    from infra import deploy as deploy_module

    monkeypatch.setattr(deploy_module, "deploy", lambda stage, parameters: health)
    outputs = {"EndpointURL": "https://api.example.com", "DashboardURL": "https://site"}
    monkeypatch.setattr(deploy_module.Stage, "outputs", lambda self: outputs)
    assert cli.main(["deploy", "--region", "us-east-1"]) == status
    printed = capsys.readouterr()
    assert "API:       https://api.example.com" in printed.out
    expected = f"deploy: error: deployed, but GET /health says {health}: see docs/deploy.md"
    assert (expected in printed.err) is bool(status)
