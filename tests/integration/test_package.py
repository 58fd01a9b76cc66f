"""`chalice package` of the prod stage, merged with infra/template.json, is a deployable template.

Chalice builds the Lambda zip (manylinux wheels from PyPI) and the SAM template; the merge
template adds the stage queue and its dead-letter queue, turns on partial batch failures for
the `run_stage` SQS trigger, makes API Gateway's own errors answer with our JSON envelope, and
adds what `make deploy` needs: one least-privilege role and log group per function, secrets
read from SSM, an optional VPC, the dead-letter alarm, and the dashboard in a private bucket
behind CloudFront. The `migrate`
function's zip is checked to carry its migrations, and run from the zip against a fresh
database. Packaging takes about 10 s when requirements.txt, app.py or chalicelib changed
(Chalice keeps the built zip in .chalice/deployments, keyed by their hash) and about 1 s
otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest
from sqlalchemy import create_engine, text

from chalicelib.config import load_settings, ssm_names
from chalicelib.engine.queue import MAX_RECEIVES
from chalicelib.engine.sweeper import FUNCTION_TIMEOUT_SECONDS
from tests.conftest import (
    ADMIN_DATABASE_URL,
    OWNER_DATABASE_URL,
    TEST_DATABASE_NAME,
    TEST_DATABASE_URL,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROJECT_DIR = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent
DEPLOYMENTS_DIR = PROJECT_DIR / ".chalice" / "deployments"
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


FUNCTIONS = {
    "APIHandler": "app.app",
    "RunStage": "app.run_stage",
    "SweepStalledStages": "app.sweep_stalled_stages",
    "CheckAgentHealth": "app.check_agent_health",
    "Migrate": "app.migrate",
    "WriteAuditCheckpoint": "app.write_audit_checkpoint",
}
# What the functions may do to the audit checkpoints in S3 (objects only, never delete):
# read them by version and list their versions (a second version is tampering), and put
# a key that does not exist yet.
CHECKPOINT_ACTIONS = {
    "APIHandler": {"s3:GetObjectVersion", "s3:ListBucketVersions"},
    "WriteAuditCheckpoint": {"s3:PutObject", "s3:GetObjectVersion", "s3:ListBucketVersions"},
}
# The prefixes they may list: a run's markers, and one checkpoint object's versions.
CHECKPOINT_LIST_PREFIXES = ["checkpoints/runs/*", "checkpoints/??????????-????????????????.json"]
# What the functions may do to the stage queue, and nothing more.
QUEUE_ACTIONS = {
    "APIHandler": {"sqs:SendMessage", "sqs:GetQueueAttributes"},
    "RunStage": {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",  # a failed record comes back in seconds, not 90 min
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",
    },
    # The queue's depth tells a lost message from one behind a backlog.
    "SweepStalledStages": {"sqs:SendMessage", "sqs:GetQueueAttributes"},
    # An agent back from offline: the stages waiting for it are sent to workers at once.
    "CheckAgentHealth": {"sqs:SendMessage"},
    "Migrate": set(),
    "WriteAuditCheckpoint": set(),
}
# Lambda's own network interfaces in a VPC: EC2 grants these on no narrower resource.
ENI_ACTIONS = {
    "ec2:CreateNetworkInterface",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeSubnets",
    "ec2:DeleteNetworkInterface",
    "ec2:AssignPrivateIpAddresses",
    "ec2:UnassignPrivateIpAddresses",
}
# X-Ray has no resource-level permissions: its two write actions need "*".
TRACE_ACTIONS = {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}


def _functions(resources: dict[str, Any]) -> dict[str, Any]:
    return {
        name: resource
        for name, resource in resources.items()
        if resource["Type"] == "AWS::Serverless::Function"
    }


def _statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    """A policy's statements, with both branches of each conditional (Fn::If) one."""
    found: list[dict[str, Any]] = []
    for statement in document["Statement"]:
        if "Fn::If" in statement:
            _, *branches = statement["Fn::If"]
            found += [b for b in branches if b != {"Ref": "AWS::NoValue"}]
        else:
            found.append(statement)
    return found


def _role_statements(resources: dict[str, Any], role: str) -> list[dict[str, Any]]:
    policies = resources[role]["Properties"]["Policies"]
    return [s for policy in policies for s in _statements(policy["PolicyDocument"])]


def _policy_documents(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every IAM policy document in the template, by the resource that holds it."""
    documents: list[tuple[str, dict[str, Any]]] = []
    for name, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::IAM::Role":
            documents += [(name, p["PolicyDocument"]) for p in properties.get("Policies", [])]
            assert not properties.get("ManagedPolicyArns"), name
        elif resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            documents.append((name, properties["PolicyDocument"]))
        elif resource["Type"] == "AWS::Serverless::Function":
            assert "Policies" not in properties, f"{name}: SAM policies would bypass the roles"
    return documents


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


def test_the_api_stage_is_throttled_by_template_parameters(
    template: dict[str, Any], resources: dict[str, Any]
) -> None:
    settings = resources["RestAPI"]["Properties"]["MethodSettings"]
    assert settings == [
        {
            "ResourcePath": "/*",
            "HttpMethod": "*",
            "ThrottlingRateLimit": {"Ref": "ApiThrottlingRateLimit"},
            "ThrottlingBurstLimit": {"Ref": "ApiThrottlingBurstLimit"},
        }
    ]
    for name in ("ApiThrottlingRateLimit", "ApiThrottlingBurstLimit"):
        assert template["Parameters"][name]["Default"] >= 1


def test_concurrency_is_matched_to_the_database_by_template_parameters(
    template: dict[str, Any], resources: dict[str, Any]
) -> None:
    event = _sqs_event(resources)["Properties"]
    assert event["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "RunStageMaxConcurrency"}}
    assert template["Parameters"]["RunStageMaxConcurrency"]["MinValue"] == 2  # SQS's floor
    reserved = resources["APIHandler"]["Properties"]["ReservedConcurrentExecutions"]
    assert reserved == {
        "Fn::If": [
            "HasApiReservedConcurrency",
            {"Ref": "ApiReservedConcurrency"},
            {"Ref": "AWS::NoValue"},
        ]
    }
    # Each function opens only the database connections it needs.
    pools = {
        name: resources[name]["Properties"]["Environment"]["Variables"]
        for name in ("APIHandler", "RunStage", "SweepStalledStages", "CheckAgentHealth")
    }
    assert (pools["RunStage"]["MAOF_DB_POOL_SIZE"], pools["RunStage"]["MAOF_DB_MAX_OVERFLOW"]) == (
        "10",
        "5",
    )
    for name in ("APIHandler", "SweepStalledStages", "CheckAgentHealth"):
        assert (pools[name]["MAOF_DB_POOL_SIZE"], pools[name]["MAOF_DB_MAX_OVERFLOW"]) == (
            "1",
            "2",
        ), name


def test_run_stage_reports_batch_item_failures(resources: dict[str, Any]) -> None:
    run_stage = resources["RunStage"]
    assert run_stage["Type"] == "AWS::Serverless::Function"
    assert run_stage["Properties"]["Handler"] == "app.run_stage"
    event = _sqs_event(resources)["Properties"]
    assert event["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert event["BatchSize"] == 10
    # The stack's own queue, whatever name app.py gave the trigger when it was packaged.
    assert event["Queue"] == {"Fn::Sub": "${StageQueue.Arn}"}


def test_every_function_knows_the_stacks_queue(template: dict[str, Any]) -> None:
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert shared["MAOF_STAGE_QUEUE_URL"] == {"Ref": "StageQueue"}
    assert shared["MAOF_STAGE_QUEUE_NAME"] == {"Fn::GetAtt": ["StageQueue", "QueueName"]}
    for name, function in _functions(template["Resources"]).items():
        variables = function["Properties"].get("Environment", {}).get("Variables", {})
        assert "MAOF_STAGE_QUEUE_URL" not in variables, name


def test_a_deployed_run_stores_no_more_than_the_api_can_answer(template: dict[str, Any]) -> None:
    """A Lambda function answers at most 6 MiB of proxy JSON (API Gateway: 502 beyond). The
    run cap counts what the detail carries (the run's input, every stage's input and
    output) as served in that JSON; the audit export carries the stages' outputs and the
    run's output, a second copy of the final stages': twice the cap. Deployed, both leave
    room for the rest (locally 20 MB), or a run could not be read through the API."""
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert shared["MAOF_RUN_MAX_OUTPUT_BYTES"] == {"Ref": "RunMaxOutputBytes"}
    default = template["Parameters"]["RunMaxOutputBytes"]["Default"]
    lambda_response = 6 * 1024 * 1024
    # The export's entries (hashes, stage ids, capped error texts) and the detail's stage
    # fields (100 stages' ids, names, statuses, times, error messages) share the rest.
    assert 2 * default <= lambda_response - 1_000_000, "room for the export's entries"


def test_stage_queue_redrives_to_its_dead_letter_queue(resources: dict[str, Any]) -> None:
    queue = resources["StageQueue"]
    assert queue["Type"] == "AWS::SQS::Queue"
    assert queue["Properties"]["QueueName"] == {"Fn::Sub": "${AWS::StackName}-stage-queue"}
    redrive = queue["Properties"]["RedrivePolicy"]
    assert redrive["maxReceiveCount"] == MAX_RECEIVES
    dlq_id, attribute = redrive["deadLetterTargetArn"]["Fn::GetAtt"]
    assert attribute == "Arn"
    dlq = resources[dlq_id]
    assert dlq["Type"] == "AWS::SQS::Queue"
    assert dlq["Properties"]["QueueName"] == {"Fn::Sub": "${AWS::StackName}-stage-queue-dlq"}
    # What the alarm and the deploy guide tell the operator is the queue's own count.
    alarm = resources["DeadLetterAlarm"]["Properties"]["AlarmDescription"]["Fn::Sub"]
    assert f"received {MAX_RECEIVES} times without finishing" in alarm
    guide = (PROJECT_DIR / "docs" / "deploy.md").read_text()
    assert f"a message received {MAX_RECEIVES} times goes to the dead-letter queue" in guide


def test_stage_queue_hides_a_message_for_six_function_timeouts(resources: dict[str, Any]) -> None:
    timeout = resources["RunStage"]["Properties"]["Timeout"]
    # The longest stage timeout allowed is derived from it (MAOF_RUN_STAGE_TIMEOUT_SECONDS).
    assert timeout == load_settings().run_stage_timeout_seconds == 900
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


def test_only_api_gateways_own_answers_admit_every_origin(
    template: dict[str, Any], resources: dict[str, Any]
) -> None:
    """The preflights (written by `chalice package`, before the dashboard's origin exists)
    and the gateway responses say `*`, the functions' replies the dashboard's origin, and
    the deploy guide says so."""
    paths = resources["RestAPI"]["Properties"]["DefinitionBody"]["paths"]
    preflights = {
        path["options"]["x-amazon-apigateway-integration"]["responses"]["default"][
            "responseParameters"
        ]["method.response.header.Access-Control-Allow-Origin"]
        for path in paths.values()
        if "options" in path
    }
    assert preflights == {"'*'"}
    gateway = resources["RestAPI"]["Properties"]["GatewayResponses"].values()
    assert {r["ResponseParameters"]["Headers"]["Access-Control-Allow-Origin"] for r in gateway} == {
        "'*'"
    }
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert "DashboardDistribution.DomainName" in json.dumps(shared["MAOF_CORS_ORIGIN"])
    guide = " ".join((PROJECT_DIR / "docs" / "deploy.md").read_text().split())
    assert "What API Gateway answers itself says `*`: the preflight" in guide
    assert (
        "API Gateway's preflight and own errors say `*`"
        in (PROJECT_DIR / "docs" / "security.md").read_text()
    )


def test_secrets_stay_out_of_the_template(template: dict[str, Any]) -> None:
    secret_names = {"MAOF_JWT_SECRET", "MAOF_SECRET_KEY", "MAOF_DATABASE_URL", "MAOF_REDIS_URL"}
    for name, resource in template["Resources"].items():
        variables = resource.get("Properties", {}).get("Environment", {}).get("Variables", {})
        assert not secret_names & set(variables), name
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert not secret_names & set(shared)
    assert shared["MAOF_SECRETS_SSM_PATH"] == {"Ref": "SecretsParameterPath"}
    assert template["Parameters"]["SecretsParameterPath"]["Type"] == "String"
    # No parameter carries a secret value: secrets are SSM SecureStrings the functions read.
    for name in template["Parameters"]:
        assert not any(word in name.lower() for word in ("password", "token", "url")), name


def test_functions_read_only_their_own_ssm_path(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    read: dict[str, set[str]] = {}
    for name in FUNCTIONS:
        reads = [s for s in _role_statements(resources, f"{name}Role") if s["Sid"] == "ReadSecrets"]
        assert len(reads) == 1, name
        assert reads[0]["Action"] == ["ssm:GetParameters"]
        readable = [r["Fn::Sub"] for r in reads[0]["Resource"]]
        prefix = ":parameter${SecretsParameterPath}/"
        assert all(prefix in r for r in readable), name
        # What the function asks SSM for, and no more: the owner's migration-database-url
        # for Migrate alone, the JWT secrets for the API alone (no other can mint a token),
        # of those only its MAOF_SECRETS_SSM_NAMES where set.
        variables = template["Resources"][name]["Properties"]["Environment"]["Variables"]
        only = variables.get("MAOF_SECRETS_SSM_NAMES")
        names = ssm_names(
            token_issuer=name == "APIHandler",
            migrator=name == "Migrate",
            only=only.split(",") if only else None,
        )
        assert sorted(r.rsplit("/", 1)[1] for r in readable) == sorted(names), name
        read[name] = set(names)
        assert variables.get("MAOF_TOKEN_ISSUER") == ("true" if name == "APIHandler" else None)
        assert variables.get("MAOF_MIGRATOR") == ("true" if name == "Migrate" else None)
        decrypt = [
            s for s in _role_statements(resources, f"{name}Role") if "kms:Decrypt" in s["Action"]
        ]
        assert [s["Resource"] for s in decrypt] == [{"Ref": "SecretsKmsKeyArn"}], name
    # The health checker, which calls user-registered URLs every minute, and the
    # checkpointer decrypt no agent token or callback secret: neither reads the keys that
    # do, nor the health checker the audit signing key (it writes no audit entry).
    assert read["CheckAgentHealth"] == {"database-url", "redis-url"}
    assert read["WriteAuditCheckpoint"] == {"database-url", "redis-url", "audit-signing-key"}
    # Migrate, the one holding the schema owner's URL, signs nothing: with the signing key
    # too, whoever can invoke or change it could rewrite a run and sign it again. It reads
    # the keys re-encryption moves the agent tokens between, and Redis, whose cached agent
    # lists it retires.
    assert read["Migrate"] == {
        "database-url",
        "migration-database-url",
        "redis-url",
        "secret-key",
        "previous-secret-keys",
    }
    for name in ("APIHandler", "RunStage", "SweepStalledStages"):
        assert {"secret-key", "previous-secret-keys", "audit-signing-key"} <= read[name], name


def test_each_function_has_its_own_role_and_log_group(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    functions = _functions(resources)
    assert {name: f["Properties"]["Handler"] for name, f in functions.items()} == FUNCTIONS
    roles = set()
    for name, function in functions.items():
        role = function["Properties"]["Role"]["Fn::GetAtt"]
        assert role == [f"{name}Role", "Arn"], name
        assert resources[role[0]]["Type"] == "AWS::IAM::Role"
        roles.add(role[0])
        trust = resources[role[0]]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        assert [t["Principal"] for t in trust] == [{"Service": "lambda.amazonaws.com"}]
        log_group = function["Properties"]["LoggingConfig"]["LogGroup"]
        assert log_group == {"Ref": f"{name}LogGroup"}
        group = resources[f"{name}LogGroup"]
        assert group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
        writes = [s for s in _role_statements(resources, role[0]) if s["Sid"] == "WriteOwnLogs"]
        assert writes == [
            {
                "Sid": "WriteOwnLogs",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": {"Fn::GetAtt": [f"{name}LogGroup", "Arn"]},
            }
        ]
    assert len(roles) == len(functions)
    # Chalice's own roles (autogen_policy, `*` resources) are gone.
    assert "DefaultRole" not in resources


# Every retention CloudWatch Logs accepts (AWS::Logs::LogGroup RetentionInDays).
LOG_RETENTIONS = [1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827]
LOG_RETENTIONS += [2192, 2557, 2922, 3288, 3653]


def test_log_retention_takes_every_value_cloudwatch_accepts(template: dict[str, Any]) -> None:
    """Seven years (2557 days, as long as audit records are often kept) among them."""
    parameter = template["Parameters"]["LogRetentionDays"]
    assert parameter["AllowedValues"] == LOG_RETENTIONS
    assert parameter["Default"] in LOG_RETENTIONS


def test_no_iam_policy_allows_a_wildcard_action(template: dict[str, Any]) -> None:
    documents = _policy_documents(template)
    assert len(documents) >= len(FUNCTIONS)
    on_everything: set[str] = set()
    for holder, document in documents:
        for statement in _statements(document):
            assert statement["Effect"] == "Allow", holder
            assert "NotAction" not in statement and "NotResource" not in statement, holder
            actions = statement["Action"]
            assert isinstance(actions, list) and actions, holder
            for action in actions:
                service, _, verb = action.partition(":")
                assert service and verb and "*" not in action and "?" not in action, (
                    holder,
                    action,
                )
            if statement["Resource"] == "*" or "*" in statement["Resource"]:
                assert set(actions) <= ENI_ACTIONS or set(actions) <= TRACE_ACTIONS, (
                    holder,
                    statement,
                )
                on_everything.add(statement["Sid"])
    # The deploy guide names each kind of statement on Resource "*", and no other.
    assert on_everything == {"VpcNetworkInterfaces", "WriteTraces"}
    guide = " ".join((PROJECT_DIR / "docs" / "deploy.md").read_text().split())
    assert "X-Ray trace actions and the VPC network-interface actions" in guide
    assert 'the only statements on `Resource: "*"` (X-Ray has no resource-level' in guide


# The audit bucket: the stack's own, or the one an earlier stack of the stage left behind.
AUDIT_BUCKET_NAME = {
    "Fn::If": ["CreateAuditBucket", {"Ref": "AuditBucket"}, {"Ref": "ExistingAuditBucketName"}]
}


def _audit_bucket_arn(suffix: str) -> dict[str, Any]:
    arn = "arn:${AWS::Partition}:s3:::${AuditBucketName}" + suffix
    return {"Fn::Sub": [arn, {"AuditBucketName": AUDIT_BUCKET_NAME}]}


def _references(node: Any, resource: str) -> int:
    """How many times `node` names `resource` (Ref, GetAtt or in a Fn::Sub string)."""
    if isinstance(node, dict):
        if node.get("Ref") == resource:
            return 1
        if "Fn::GetAtt" in node and node["Fn::GetAtt"][0] == resource:
            return 1
        sub = node.get("Fn::Sub")
        found = (
            ("${" + resource + "}" in sub or "${" + resource + "." in sub)
            if isinstance(sub, str)
            else 0
        )
        return int(found) + sum(_references(value, resource) for value in node.values())
    if isinstance(node, list):
        return sum(_references(value, resource) for value in node)
    return 0


def test_a_stage_deployed_again_keeps_the_audit_bucket_it_left_behind(
    template: dict[str, Any], package_dir: Path, tmp_path: Path
) -> None:
    """The audit bucket outlives `make destroy` (Object Lock): deployed again with its name
    (ExistingAuditBucketName), the stack creates none and every function, policy and output
    uses that one, so the runs checkpointed before still verify; without it, its own."""
    parameter = template["Parameters"]["ExistingAuditBucketName"]
    assert (parameter["Type"], parameter["Default"]) == ("String", "")
    assert template["Conditions"]["CreateAuditBucket"] == {
        "Fn::Equals": [{"Ref": "ExistingAuditBucketName"}, ""]
    }
    resources = template["Resources"]
    assert resources["AuditBucket"]["Condition"] == "CreateAuditBucket"
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert shared["MAOF_AUDIT_BUCKET"] == AUDIT_BUCKET_NAME
    assert template["Outputs"]["AuditBucketName"]["Value"] == AUDIT_BUCKET_NAME
    # Nothing but AUDIT_BUCKET_NAME names the bucket resource, which may not exist: the
    # functions' variable, their roles, the bucket policy, the output.
    others = {name: r for name, r in resources.items() if name != "AuditBucket"}
    rest = json.dumps({**template, "Resources": others})
    rest = rest.replace(json.dumps(AUDIT_BUCKET_NAME), '"<the audit bucket>"')
    assert _references(json.loads(rest), "AuditBucket") == 0
    assert rest.count("<the audit bucket>") >= 10
    # cfn-lint passes both ways.
    given = json.loads(json.dumps(template))
    given["Parameters"]["ExistingAuditBucketName"]["Default"] = "maof-prod-auditbucket-1a2b3c"
    (tmp_path / "given.json").write_text(json.dumps(given))
    for path in (package_dir / "sam.json", tmp_path / "given.json"):
        result = subprocess.run(
            [str(BIN_DIR / "cfn-lint"), str(path)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_queue_permissions_fit_each_function(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    for name, allowed in QUEUE_ACTIONS.items():
        statements = _role_statements(resources, f"{name}Role")
        sqs = [s for s in statements if any(a.startswith("sqs:") for a in s["Action"])]
        actions = {a for s in sqs for a in s["Action"]}
        assert actions == allowed, name
        for statement in sqs:
            assert statement["Resource"] == {"Fn::GetAtt": ["StageQueue", "Arn"]}, name
        # Only SSM, logs, KMS, the VPC's network interfaces and the queue: nothing else;
        # and the audit checkpoints' objects for the API (read) and the checkpointer.
        services = {a.split(":")[0] for s in statements for a in s["Action"]}
        allowed_services = {"sqs", "ssm", "logs", "kms", "ec2", "xray"}
        if name in CHECKPOINT_ACTIONS:
            allowed_services.add("s3")
        assert services <= allowed_services, (name, services)
        s3 = [s for s in statements if any(a.startswith("s3:") for a in s["Action"])]
        assert {a for s in s3 for a in s["Action"]} == CHECKPOINT_ACTIONS.get(name, set()), name
        for statement in s3:
            if statement["Action"] == ["s3:ListBucketVersions"]:  # markers and checkpoints
                assert statement["Resource"] == _audit_bucket_arn("")
                assert statement["Condition"] == {
                    "StringLike": {"s3:prefix": CHECKPOINT_LIST_PREFIXES}
                }
                continue
            assert statement["Resource"] == _audit_bucket_arn("/checkpoints/*")
            if "s3:PutObject" in statement["Action"]:  # a key is written once
                assert statement["Action"] == ["s3:PutObject"], name
                assert statement["Condition"] == {"StringEquals": {"s3:if-none-match": "*"}}
            else:
                assert "Condition" not in statement, name


def test_the_audit_bucket_takes_each_checkpoint_key_once_hides_none_and_only_over_tls(
    resources: dict[str, Any],
) -> None:
    """Object Lock locks versions, not keys: the bucket policy refuses every PUT under
    `checkpoints/` that does not carry `If-None-Match: *`, and every delete without a
    version (a delete marker, which hides the version a reader would find), whoever sends
    it, so no checkpoint or marker can be replaced or hidden without first changing the
    policy. Deleting a version Object Lock refuses until its retention ends."""
    bucket = resources["AuditBucket"]["Properties"]
    assert bucket["ObjectLockConfiguration"]["Rule"]["DefaultRetention"]["Mode"] == "COMPLIANCE"
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    policies = [
        r["Properties"]
        for r in resources.values()
        if r["Type"] == "AWS::S3::BucketPolicy" and r["Properties"]["Bucket"] == AUDIT_BUCKET_NAME
    ]
    assert len(policies) == 1
    statements = policies[0]["PolicyDocument"]["Statement"]
    assert [s["Sid"] for s in statements] == [
        "WriteEachCheckpointKeyOnce",
        "NoDeleteMarkersUnderCheckpoints",
        "RefuseRequestsWithoutTls",
    ]
    once, kept, tls = statements
    assert once == {
        "Sid": "WriteEachCheckpointKeyOnce",
        "Effect": "Deny",
        "Principal": "*",
        "Action": ["s3:PutObject"],
        "Resource": _audit_bucket_arn("/checkpoints/*"),
        # A request without the header lacks the key, and StringNotEquals then holds.
        "Condition": {"StringNotEquals": {"s3:if-none-match": "*"}},
    }
    assert kept == {
        "Sid": "NoDeleteMarkersUnderCheckpoints",
        "Effect": "Deny",
        "Principal": "*",
        "Action": ["s3:DeleteObject"],  # with a versionId it is s3:DeleteObjectVersion
        "Resource": _audit_bucket_arn("/checkpoints/*"),
    }
    assert tls == {
        "Sid": "RefuseRequestsWithoutTls",
        "Effect": "Deny",
        "Principal": "*",
        "Action": ["s3:*"],
        "Resource": [_audit_bucket_arn(""), _audit_bucket_arn("/*")],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }
    # No function may delete (a delete marker) or change a retention.
    for name in FUNCTIONS:
        actions = {a for s in _role_statements(resources, f"{name}Role") for a in s["Action"]}
        assert not {a for a in actions if a.startswith("s3:Delete")}, name
        assert not {a for a in actions if "Retention" in a or "LegalHold" in a}, name


def test_the_audit_bucket_keeps_its_policy_when_the_stack_lets_go_of_it(
    resources: dict[str, Any],
) -> None:
    """`make destroy` keeps the bucket (Object Lock holds its checkpoints for years), and
    its policy with it: its rules hold until a stack takes the bucket again
    (AUDIT_BUCKET=, whose deploy deletes the kept policy for the stack to put its own)."""
    for name in ("AuditBucket", "AuditBucketPolicy"):
        assert resources[name]["DeletionPolicy"] == "Retain", name
        assert resources[name]["UpdateReplacePolicy"] == "Retain", name


def test_functions_join_the_vpc_given_as_parameters(template: dict[str, Any]) -> None:
    vpc = template["Globals"]["Function"]["VpcConfig"]["Fn::If"]
    assert vpc == [
        "UseVpc",
        {"SubnetIds": {"Ref": "SubnetIds"}, "SecurityGroupIds": {"Ref": "SecurityGroupIds"}},
        {"Ref": "AWS::NoValue"},
    ]
    for name in ("SubnetIds", "SecurityGroupIds"):
        assert template["Parameters"][name]["Type"] == "CommaDelimitedList"
    for name, function in _functions(template["Resources"]).items():
        assert "VpcConfig" not in function["Properties"], name
    for name in FUNCTIONS:
        enis = [
            s
            for s in _role_statements(template["Resources"], f"{name}Role")
            if s.get("Sid") == "VpcNetworkInterfaces"
        ]
        assert len(enis) == 1 and set(enis[0]["Action"]) == ENI_ACTIONS, name


# API Gateway's integration timeout (REST APIs, edge or regional): the client has a 504 then.
API_GATEWAY_TIMEOUT_SECONDS = 29


def test_the_api_function_stops_when_api_gateway_stops_waiting(
    resources: dict[str, Any],
) -> None:
    """A request API Gateway gave up on holds no function, nor its database connection,
    past the moment its client had a 504."""
    assert resources["APIHandler"]["Properties"]["Timeout"] <= API_GATEWAY_TIMEOUT_SECONDS
    schedules = ("SweepStalledStages", "CheckAgentHealth", "WriteAuditCheckpoint")
    assert [resources[name]["Properties"]["Timeout"] for name in schedules] == [60, 60, 60]
    # A request held on a lock or a statement is a 503 before that (a worker hung with its
    # run's lock held it 60 s); no other function's statement is ever cut.
    for name, function in _functions(resources).items():
        variables = function["Properties"]["Environment"]["Variables"]
        limits = [
            variables.get(v) for v in ("MAOF_DB_LOCK_TIMEOUT_MS", "MAOF_DB_STATEMENT_TIMEOUT_MS")
        ]
        if name == "APIHandler":
            assert int(limits[0]) <= 5000 and int(limits[1]) < API_GATEWAY_TIMEOUT_SECONDS * 1000
        else:
            assert limits == [None, None], name
    # What a sweep given no Lambda context takes its function's time to be.
    assert resources["SweepStalledStages"]["Properties"]["Timeout"] == FUNCTION_TIMEOUT_SECONDS


def test_the_migrate_function_runs_only_when_invoked(template: dict[str, Any]) -> None:
    migrate = template["Resources"]["Migrate"]
    assert migrate["Properties"]["Handler"] == "app.migrate"
    assert "Events" not in migrate["Properties"]
    assert migrate["Properties"]["Timeout"] == 300
    assert template["Outputs"]["MigrateFunctionName"]["Value"] == {"Ref": "Migrate"}


def _schedules(template: dict[str, Any]) -> dict[str, str]:
    return {
        name: event["Properties"]["Schedule"]
        for name, function in _functions(template["Resources"]).items()
        for event in function["Properties"].get("Events", {}).values()
        if event["Type"] == "Schedule"
    }


def _schedules_when_imported(settings: dict[str, str]) -> dict[str, str]:
    """The app's schedules as `chalice package` binds them, with `settings` in the
    environment (Chalice adds the stage's environment_variables before importing app.py)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAOF_")}
    env.update(PACKAGE_ENV | settings)
    code = (
        "import json, app\n"
        "print(json.dumps({s.name: s.schedule_expression.to_string() "
        "for s in app.app.event_sources if hasattr(s, 'schedule_expression')}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_schedules_run_every_minute_by_default(template: dict[str, Any]) -> None:
    assert _schedules(template) == {
        "SweepStalledStages": "rate(1 minute)",
        "CheckAgentHealth": "rate(1 minute)",
        "WriteAuditCheckpoint": "rate(1 minute)",
    }


@pytest.mark.parametrize(
    ("seconds", "rate"),
    [("600", "rate(10 minutes)"), ("90", "rate(1 minute)"), ("5", "rate(1 minute)")],
)
def test_the_health_check_and_checkpoint_schedules_follow_their_intervals(
    seconds: str, rate: str
) -> None:
    """EventBridge runs a schedule in whole minutes, one at least: each interval setting,
    rounded down to them."""
    schedules = _schedules_when_imported(
        {
            "MAOF_AGENT_HEALTH_INTERVAL_SECONDS": seconds,
            "MAOF_AUDIT_CHECKPOINT_INTERVAL_SECONDS": seconds,
        }
    )
    assert schedules["check_agent_health"] == rate, schedules
    assert schedules["write_audit_checkpoint"] == rate, schedules
    assert schedules["sweep_stalled_stages"] == "rate(1 minute)", schedules


def test_dead_letter_queue_depth_raises_an_alarm(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    alarm = resources["DeadLetterAlarm"]
    assert alarm["Type"] == "AWS::CloudWatch::Alarm"
    props = alarm["Properties"]
    assert props["Namespace"] == "AWS/SQS"
    assert props["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert props["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["StageDeadLetterQueue", "QueueName"]}}
    ]
    assert props["ComparisonOperator"] == "GreaterThanThreshold"
    assert props["Threshold"] == 0
    assert props["TreatMissingData"] == "notBreaching"
    assert props["AlarmActions"] == {
        "Fn::If": ["HasAlarmEmail", [{"Ref": "AlarmTopic"}], {"Ref": "AWS::NoValue"}]
    }
    topic = resources["AlarmTopic"]
    assert topic["Condition"] == "HasAlarmEmail"
    assert topic["Properties"]["Subscription"] == [
        {"Protocol": "email", "Endpoint": {"Ref": "AlarmEmail"}}
    ]


def test_the_dashboard_is_served_over_https_by_cloudfront_from_a_private_bucket(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    bucket = resources["DashboardBucket"]["Properties"]
    assert "WebsiteConfiguration" not in bucket
    assert "BucketName" not in bucket  # CloudFormation picks a unique one
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    policy = resources["DashboardBucketPolicy"]["Properties"]
    assert policy["Bucket"] == {"Ref": "DashboardBucket"}
    allow, deny = policy["PolicyDocument"]["Statement"]
    assert allow == {
        "Sid": "ReadByThisStacksDistributionOnly",
        "Effect": "Allow",
        "Principal": {"Service": "cloudfront.amazonaws.com"},
        "Action": ["s3:GetObject"],
        "Resource": {"Fn::Sub": "${DashboardBucket.Arn}/*"},
        "Condition": {
            "StringEquals": {
                "AWS:SourceArn": {
                    "Fn::Sub": "arn:${AWS::Partition}:cloudfront::${AWS::AccountId}"
                    ":distribution/${DashboardDistribution}"
                }
            }
        },
    }
    assert deny["Effect"] == "Deny"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}

    distribution = resources["DashboardDistribution"]["Properties"]["DistributionConfig"]
    assert distribution["DefaultRootObject"] == "index.html"
    assert distribution["ViewerCertificate"] == {"CloudFrontDefaultCertificate": True}
    (origin,) = distribution["Origins"]
    assert origin["DomainName"] == {"Fn::GetAtt": ["DashboardBucket", "RegionalDomainName"]}
    assert origin["OriginAccessControlId"] == {"Fn::GetAtt": ["DashboardOriginAccessControl", "Id"]}
    assert origin["S3OriginConfig"] == {"OriginAccessIdentity": ""}  # no legacy OAI
    access = resources["DashboardOriginAccessControl"]["Properties"]["OriginAccessControlConfig"]
    assert (access["OriginAccessControlOriginType"], access["SigningBehavior"]) == ("s3", "always")
    default = distribution["DefaultCacheBehavior"]
    (config,) = distribution["CacheBehaviors"]
    assert config["PathPattern"] == "/config.json"
    assert config["CachePolicyId"] == "4135ea2d-6df8-44a3-9df3-4b5a84be39ad"  # CachingDisabled
    assert default["CachePolicyId"] == {"Ref": "DashboardCachePolicy"}
    for behaviour in (default, config):
        assert behaviour["TargetOriginId"] == origin["Id"]
        assert behaviour["ViewerProtocolPolicy"] == "redirect-to-https"
        assert behaviour["AllowedMethods"] == ["GET", "HEAD"]
        assert behaviour["ResponseHeadersPolicyId"] == {"Ref": "DashboardResponseHeadersPolicy"}
    cache = resources["DashboardCachePolicy"]["Properties"]["CachePolicyConfig"]
    assert cache["MinTTL"] <= 300  # a site changed without `make deploy` shows within minutes

    headers = resources["DashboardResponseHeadersPolicy"]["Properties"]
    security = headers["ResponseHeadersPolicyConfig"]["SecurityHeadersConfig"]
    hsts = security["StrictTransportSecurity"]
    assert hsts["AccessControlMaxAgeSec"] >= 365 * 24 * 3600 and hsts["IncludeSubdomains"]
    assert security["ContentTypeOptions"] == {"Override": True}
    assert security["FrameOptions"] == {"FrameOption": "DENY", "Override": True}
    assert security["ReferrerPolicy"] == {"ReferrerPolicy": "no-referrer", "Override": True}
    csp = security["ContentSecurityPolicy"]["ContentSecurityPolicy"]["Fn::Sub"]
    assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe" not in csp

    # The API admits the dashboard's https origin by default; the outputs name both.
    cors = template["Globals"]["Function"]["Environment"]["Variables"]["MAOF_CORS_ORIGIN"]
    assert cors["Fn::If"][2] == {"Fn::Sub": "https://${DashboardDistribution.DomainName}"}
    assert template["Outputs"]["DashboardURL"]["Value"] == {
        "Fn::Sub": "https://${DashboardDistribution.DomainName}/"
    }
    assert template["Outputs"]["DashboardDistributionId"]["Value"] == {
        "Ref": "DashboardDistribution"
    }
    assert "DashboardWebsiteURL" not in template["Outputs"]


# Properties that name a resource in the account (unique per account and region, or shown
# to operators); a stage's resources must take their names from its stack's.
NAME_PROPERTIES = {
    *("QueueName", "BucketName", "FunctionName", "LogGroupName", "AlarmName", "DashboardName"),
    *("TopicName", "RoleName", "Name", "DisplayName"),
}


def _names(node: Any, path: str = "") -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Dimensions":  # a metric's, named by what it measures
                continue
            if key in NAME_PROPERTIES:
                found.append((f"{path}.{key}", value))
            else:
                found += _names(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _names(value, f"{path}[{index}]")
    return found


def test_every_name_derives_from_the_stack(template: dict[str, Any]) -> None:
    """`make deploy STAGE=dev` and `STAGE=prod` side by side in one account and region: no
    fixed names (CloudFormation makes up those not given), and alarms and the operations
    dashboard read only their own stage's metrics (the `service` dimension)."""
    resources = template["Resources"]
    for name, resource in resources.items():
        for where, value in _names(resource.get("Properties", {}), name):
            derived = isinstance(value, dict) and "${AWS::StackName}" in value.get("Fn::Sub", "")
            # or another resource's own name, by reference
            referred = isinstance(value, dict) and value.get("Ref", "") in resources
            assert derived or referred, (where, value)
    shared = template["Globals"]["Function"]["Environment"]["Variables"]
    assert shared["POWERTOOLS_SERVICE_NAME"] == {"Ref": "AWS::StackName"}
    services = [
        value
        for resource in template["Resources"].values()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
        for where, value in _dimensions(resource["Properties"])
        if where == "service"
    ]
    assert services and all(value == {"Ref": "AWS::StackName"} for value in services), services
    body = template["Resources"]["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    assert '"service", "maof"' not in body and '"service", "${AWS::StackName}"' in body


# Resources whose names are one namespace for the whole account, every region's stacks
# included, and the longest name each takes.
ACCOUNT_WIDE_NAMES = {
    "AWS::CloudFront::OriginAccessControl": 64,
    "AWS::CloudFront::CachePolicy": 128,
    "AWS::CloudFront::ResponseHeadersPolicy": 128,
    "AWS::CloudWatch::Dashboard": 255,
}


def test_account_wide_names_differ_between_regions(template: dict[str, Any]) -> None:
    """The same stage deployed in two regions of one account: the names CloudFront and
    CloudWatch dashboards keep account-wide carry the region, and fit their limits for a
    stage of 20 characters in the longest region name."""
    found = 0
    for name, resource in template["Resources"].items():
        if resource["Type"] not in ACCOUNT_WIDE_NAMES:
            continue
        for where, value in _names(resource["Properties"], name):
            found += 1
            assert "${AWS::Region}" in value["Fn::Sub"], where
            rendered = value["Fn::Sub"].replace("${AWS::StackName}", "maof-" + "s" * 20)
            rendered = rendered.replace("${AWS::Region}", "ap-southeast-4")
            assert len(rendered) <= ACCOUNT_WIDE_NAMES[resource["Type"]], where
    assert found == len(ACCOUNT_WIDE_NAMES)


def _dimensions(node: Any) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        if "Dimensions" in node:
            return [(d["Name"], d["Value"]) for d in node["Dimensions"]]
        return [found for value in node.values() for found in _dimensions(value)]
    if isinstance(node, list):
        return [found for value in node for found in _dimensions(value)]
    return []


def test_aws_cloudformation_package_uploads_the_code_and_points_the_functions_at_it(
    package_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `make deploy` has the AWS CLI do with the package (LocalStack's S3 here)."""
    import hashlib
    import uuid

    import boto3

    from tests.integration.conftest import localstack_endpoint

    for name, value in {"AWS_ENDPOINT_URL": localstack_endpoint(), **PACKAGE_ENV}.items():
        monkeypatch.setenv(name, value)
    bucket = boto3.resource("s3").Bucket(f"maof-test-artifacts-{uuid.uuid4().hex[:8]}")
    bucket.create()
    packaged = tmp_path / "packaged.json"
    try:
        command = [sys.executable, "-m", "awscli", "cloudformation", "package", "--use-json"]
        command += ["--template-file", str(package_dir / "sam.json"), "--s3-bucket", bucket.name]
        command += ["--s3-prefix", "prod", "--output-template-file", str(packaged)]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        code = hashlib.md5((package_dir / "deployment.zip").read_bytes()).hexdigest()  # noqa: S324
        assert [o.key for o in bucket.objects.all()] == [f"prod/{code}"]
        functions = _functions(json.loads(packaged.read_text())["Resources"])
        assert len(functions) == len(FUNCTIONS)
        for function in functions.values():
            assert function["Properties"]["CodeUri"] == f"s3://{bucket.name}/prod/{code}"
    finally:
        bucket.objects.all().delete()
        bucket.delete()


def test_zip_carries_the_migrations_and_what_runs_them(package_dir: Path) -> None:
    from chalicelib.db.migrate import SCRIPT_LOCATION

    with zipfile.ZipFile(package_dir / "deployment.zip") as archive:
        names = set(archive.namelist())
    scripts = {
        path.relative_to(PROJECT_DIR).as_posix()
        for path in SCRIPT_LOCATION.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {
        "chalicelib/db/migrations/env.py",
        "chalicelib/db/migrations/script.py.mako",
        "chalicelib/db/migrations/versions/0001_initial.py",
    } <= scripts
    assert scripts <= names
    for package in ("alembic", "mako", "sqlalchemy", "psycopg", "psycopg_binary", "rfc8785"):
        assert f"{package}/__init__.py" in names, package
    assert "app.py" in names
    # Dev tooling stays out, the client and the `maof` command line with their dependencies too.
    outside = ("migrations/", "infra/", "tests/", "maof_client/", "examples/", "rich/", "yaml/")
    assert not any(name.startswith(outside) for name in names)


def test_migrate_function_from_the_zip_migrates_a_fresh_database(
    package_dir: Path, tmp_path: Path
) -> None:
    """app.py and chalicelib exactly as zipped (the dependencies are this machine's, as the
    zip's manylinux wheels may not load here), with nothing of the project on sys.path."""
    from chalicelib.db import SCHEMA_REVISION

    with zipfile.ZipFile(package_dir / "deployment.zip") as archive:
        for name in archive.namelist():
            if name == "app.py" or name.startswith("chalicelib/"):
                archive.extract(name, tmp_path)
    database = f"{TEST_DATABASE_NAME}_zip"
    admin = create_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {database}"))
    url = urlunparse(urlparse(TEST_DATABASE_URL)._replace(path=f"/{database}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAOF_") and k != "PYTHONPATH"}
    owner = urlunparse(urlparse(OWNER_DATABASE_URL)._replace(path=f"/{database}"))
    env.update(
        {
            "MAOF_STAGE": "test",
            "MAOF_DATABASE_URL": url,
            "MAOF_MIGRATION_DATABASE_URL": owner,
            "MAOF_LOG_LEVEL": "WARNING",
        }
    )
    script = (
        "import json, app, chalicelib; "
        "print(json.dumps({'lib': chalicelib.__file__, 'result': app.migrate({}, None)}))"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        assert answer["lib"].startswith(str(tmp_path)), answer["lib"]
        assert answer["result"] == {
            "migrated": True,
            "fromRevision": None,
            "toRevision": SCHEMA_REVISION,
        }
        engine = create_engine(url)
        with engine.connect() as conn:
            tables = set(
                conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
            )
        engine.dispose()
        assert {"users", "agents", "workflow_runs", "alembic_version"} <= tables
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        admin.dispose()


def test_cfn_lint_passes(package_dir: Path) -> None:
    result = subprocess.run(
        [str(BIN_DIR / "cfn-lint"), str(package_dir / "sam.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_sam_transform_keeps_the_roles_the_trigger_and_the_vpc(
    template: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What CloudFormation's AWS::Serverless transform makes of the template, offline.

    Needs aws-sam-translator, which is not in requirements-dev.txt (it pins its own
    pydantic); `pip install aws-sam-translator` into .venv to run it."""
    sam = pytest.importorskip("samtranslator.translator.transform", reason="no aws-sam-translator")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    source = json.loads(json.dumps(template))
    for function in _functions(source["Resources"]).values():
        function["Properties"]["CodeUri"] = {"Bucket": "maof-artifacts", "Key": "prod/code.zip"}

    class NoManagedPolicies:
        def load(self) -> dict[str, str]:
            return {}

    pseudo = {"AWS::Region": "us-east-1", "AWS::AccountId": "123456789012", "AWS::Partition": "aws"}
    output = sam.transform(source, pseudo, NoManagedPolicies())
    resources = output["Resources"]
    roles = {name for name, r in resources.items() if r["Type"] == "AWS::IAM::Role"}
    assert roles == {f"{name}Role" for name in FUNCTIONS}  # SAM added none of its own
    functions = {n: r for n, r in resources.items() if r["Type"] == "AWS::Lambda::Function"}
    assert set(functions) == set(FUNCTIONS)
    for name, function in functions.items():
        properties = function["Properties"]
        assert properties["Role"] == {"Fn::GetAtt": [f"{name}Role", "Arn"]}
        assert properties["LoggingConfig"] == {"LogGroup": {"Ref": f"{name}LogGroup"}}
        assert properties["VpcConfig"]["Fn::If"][0] == "UseVpc"
        variables = properties["Environment"]["Variables"]
        assert variables["MAOF_SECRETS_SSM_PATH"] == {"Ref": "SecretsParameterPath"}
        assert not {"MAOF_JWT_SECRET", "MAOF_SECRET_KEY", "MAOF_DATABASE_URL"} & set(variables)
    mappings = [r for r in resources.values() if r["Type"] == "AWS::Lambda::EventSourceMapping"]
    assert len(mappings) == 1
    assert mappings[0]["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mappings[0]["Properties"]["FunctionName"] == {"Ref": "RunStage"}
    assert mappings[0]["Properties"]["EventSourceArn"] == {"Fn::Sub": "${StageQueue.Arn}"}
    transformed = tmp_path / "cloudformation.json"
    transformed.write_text(json.dumps(output))
    result = subprocess.run(
        [str(BIN_DIR / "cfn-lint"), str(transformed)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stack_has_an_operations_dashboard_and_its_alarms(
    template: dict[str, Any], resources: dict[str, Any]
) -> None:
    dashboard = resources["OperationsDashboard"]
    assert dashboard["Type"] == "AWS::CloudWatch::Dashboard"
    body = dashboard["Properties"]["DashboardBody"]["Fn::Sub"]
    for metric in (
        "StagesFinished",
        "StageDuration",
        "AgentLatency",
        "StageFailures",
        "Fallbacks",
        "CapacityWaits",
        "SweeperRequeues",
        "OldestQueuedStageAge",
    ):
        assert metric in body, metric
    alarms = {
        name: resource["Properties"]
        for name, resource in resources.items()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
    }
    assert set(alarms) >= {
        "DeadLetterAlarm",
        "HandlerErrorsAlarm",
        "OldestQueuedStageAlarm",
        "StageFailureRateAlarm",
        "StageLatencyAlarm",
    }
    assert alarms["StageLatencyAlarm"]["ExtendedStatistic"] == "p95"
    assert alarms["OldestQueuedStageAlarm"]["MetricName"] == "OldestQueuedStageAge"
    for props in alarms.values():
        assert props["AlarmActions"] == alarms["DeadLetterAlarm"]["AlarmActions"]
    # Every function but Migrate (whose failure fails `make deploy`) counts in HandlerErrors:
    # a checkpointer failing every minute leaves runs outside any checkpoint.
    handler_errors = alarms["HandlerErrorsAlarm"]
    (expression,) = [m for m in handler_errors["Metrics"] if "Expression" in m]
    stats = {m["Id"]: m["MetricStat"] for m in handler_errors["Metrics"] if "MetricStat" in m}
    watched = {}
    for metric_id, stat in stats.items():
        metric = stat["Metric"]
        assert (metric["Namespace"], metric["MetricName"]) == ("AWS/Lambda", "Errors")
        assert (stat["Period"], stat["Stat"]) == (300, "Sum")
        [dimension] = metric["Dimensions"]
        assert dimension["Name"] == "FunctionName"
        watched[dimension["Value"]["Ref"]] = metric_id
    assert set(watched) == set(FUNCTIONS) - {"Migrate"}
    # A function with no invocations has no Errors data points: filled with 0, so it does
    # not blank the sum of the others.
    assert expression["Expression"] == " + ".join(f"FILL({i}, 0)" for i in stats)
    assert expression["ReturnData"] is True
    for name in ("RunStage", "APIHandler", "SweepStalledStages", "CheckAgentHealth", "Migrate"):
        assert (
            resources[name]["Properties"].get(
                "Tracing", template["Globals"]["Function"].get("Tracing")
            )
            == "Active"
        )
