"""`make deploy` and `make destroy` against LocalStack's CloudFormation, end to end.

LocalStack (community) runs no Lambda functions, API Gateway or CloudFront here, so the
stack is the infrastructure-only part of infra/template.json: every resource of a service
LocalStack serves (the stage queue and its dead-letter queue, the private dashboard bucket,
the dead-letter alarm and its SNS topic when LocalStack runs cloudwatch and sns), with the
queue names suffixed so concurrent runs never meet. The CloudFront distribution, its
policies and the bucket policy naming it are left out with the rest they refer to
(test_package.py checks them in the packaged template). The rest of the deploy is real code with two
stand-ins: the `migrate` function runs in this process (through Chalice's test client, with
the request checked against the Lambda API model), and the API whose /health the deploy
calls is the local server the integration tests use.

`infra.deploy.deploy` then does what it does in AWS: checks the SSM parameters, uploads the
package and the template to an artifacts bucket, creates the stack through a change set,
waits for CREATE_COMPLETE (with a deadline), invokes `migrate`, publishes the dashboard with
its config.json, checks /health. The tests read the resources back, redeploy (no changes),
and `destroy` removes everything.
"""

from __future__ import annotations

import io
import json
import re
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.validate import validate_parameters

from chalicelib.config import SSM_MIGRATION_SECRETS, SSM_SECRETS, get_settings
from chalicelib.db import SCHEMA_REVISION
from infra import deploy as infra
from infra.deploy import Aws, Deployed, StackParameters

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROJECT_DIR = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
DEADLINE_SECONDS = 180
# AWS resource type prefix -> the LocalStack service that serves it.
SERVICES = {"SQS": "sqs", "S3": "s3", "CloudWatch": "cloudwatch", "SNS": "sns", "SSM": "ssm"}
PSEUDO = {"AWS::Region", "AWS::AccountId", "AWS::Partition", "AWS::StackName", "AWS::NoValue"}


def endpoint() -> str:
    return get_settings().aws_endpoint_url or "http://127.0.0.1:4566"


def client(service: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint(),
        region_name=REGION,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def localstack_services() -> set[str]:
    with urllib.request.urlopen(f"{endpoint()}/_localstack/health", timeout=5) as response:  # noqa: S310
        services = json.load(response)["services"]
    return {name for name, state in services.items() if state in ("available", "running")}


def references(node: Any) -> set[str]:
    """Logical ids a template fragment refers to (Ref, Fn::GetAtt, ${…} in Fn::Sub)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref" and isinstance(value, str):
                found.add(value)
            elif key == "Fn::GetAtt":
                found.add(value[0] if isinstance(value, list) else value.split(".")[0])
            elif key == "Fn::Sub":
                text = value if isinstance(value, str) else value[0]
                found |= {m.split(".")[0] for m in re.findall(r"\$\{([^!}][^}]*)\}", text)}
                if not isinstance(value, str):
                    found |= references(value[1])
            else:
                found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def infrastructure_template(template: dict[str, Any], services: set[str], suffix: str) -> dict:
    """The resources of infra/template.json that `services` serve, and whatever of the
    parameters, conditions and outputs they keep meaningful."""
    resources = {
        name: json.loads(json.dumps(resource))
        for name, resource in template["Resources"].items()
        if "Type" in resource and SERVICES.get(resource["Type"].split("::")[1]) in services
    }
    known = set(template["Parameters"]) | PSEUDO
    while True:  # drop what refers to something dropped (a role, a function…)
        dangling = [
            name
            for name, resource in resources.items()
            if (references(resource) | set(resource.get("DependsOn", []))) - known - set(resources)
        ]
        if not dangling:
            break
        for name in dangling:
            del resources[name]
    for resource in resources.values():
        if resource["Type"] == "AWS::SQS::Queue":
            resource["Properties"]["QueueName"] += f"-{suffix}"
    outputs = {
        name: output
        for name, output in template["Outputs"].items()
        if not references(output) - known - set(resources)
    }
    return {
        "AWSTemplateFormatVersion": template["AWSTemplateFormatVersion"],
        "Description": "MAOF infrastructure only (tests/integration/test_infra_localstack.py)",
        "Parameters": template["Parameters"],
        "Conditions": template["Conditions"],
        "Resources": resources,
        "Outputs": outputs,
    }


class InProcessLambda:
    """The Lambda API for the deploy's two calls: requests are checked against the Lambda
    API model, and `invoke` runs the app's `migrate` function in this process."""

    def __init__(self, function: str) -> None:
        self.function = function
        self.model = client("lambda").meta.service_model
        self.invoked: list[dict[str, Any]] = []

    def _check(self, operation: str, params: dict[str, Any]) -> None:
        validate_parameters(params, self.model.operation_model(operation).input_shape)
        assert params["FunctionName"] == self.function

    def get_function_configuration(self, **params: Any) -> dict[str, Any]:
        self._check("GetFunctionConfiguration", params)
        return {"FunctionName": self.function, "State": "Active", "LastUpdateStatus": "Successful"}

    def invoke(self, **params: Any) -> dict[str, Any]:
        from chalice.test import Client

        import app as maof

        self._check("Invoke", params)
        assert params["InvocationType"] == "RequestResponse"
        self.invoked.append(params)
        with Client(maof.app, project_dir=str(PROJECT_DIR)) as lambda_client:
            payload = lambda_client.lambda_.invoke("migrate", json.loads(params["Payload"]))
        return {"StatusCode": 200, "Payload": io.BytesIO(json.dumps(payload.payload).encode())}


@dataclass
class Deployment:
    stage: str
    stack: str
    secrets_path: str
    artifacts: str
    services: set[str]
    aws: Aws
    lambda_: InProcessLambda
    done: Deployed
    api_url: str
    package_dir: Path


def fake_package(directory: Path, template: dict[str, Any], api_url: str) -> Path:
    """What `chalice package` would leave, for a stack without functions or API: the
    outputs the deploy reads from the API and function resources are given literally."""
    directory.mkdir()
    template = {
        **template,
        "Outputs": {
            **template["Outputs"],
            "EndpointURL": {"Value": f"{api_url}/"},
            "MigrateFunctionName": {"Value": "maof-test-migrate"},
        },
    }
    (directory / "sam.json").write_text(json.dumps(template))
    with zipfile.ZipFile(directory / "deployment.zip", "w") as archive:
        archive.writestr("app.py", "# the code is not run by LocalStack\n")
    return directory


def site(directory: Path) -> Path:
    (directory / "js").mkdir(parents=True)
    (directory / "index.html").write_text("<!doctype html><title>MAOF</title>")
    (directory / "js" / "app.js").write_text("export const x = 1;\n")
    (directory / "config.json").write_text('{"apiUrl": "http://checked-in"}')
    return directory


@pytest.fixture(scope="module")
def deployment(api_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    services = localstack_services()
    if "cloudformation" not in services:
        pytest.skip("LocalStack runs without cloudformation")
    suffix = uuid.uuid4().hex[:8]
    stage = f"test-{suffix}"
    path = f"/maof-test/{stage}"
    artifacts = f"maof-test-artifacts-{suffix}"
    template = infrastructure_template(
        json.loads((PROJECT_DIR / "infra" / "template.json").read_text()), services, suffix
    )
    tmp = tmp_path_factory.mktemp("deploy")
    lambda_ = InProcessLambda("maof-test-migrate")
    aws = Aws(
        region=REGION,
        cloudformation=client("cloudformation"),
        s3=client("s3"),
        ssm=client("ssm"),
        lambda_=lambda_,
        sts=client("sts"),
    )
    settings = get_settings()
    urls = {
        "database-url": settings.database_url,
        "migration-database-url": settings.migration_database_url,
        "redis-url": settings.redis_url,
    }
    infra.ensure_secrets(aws.ssm, path, urls=urls)  # what `make secrets` leaves
    email = "ops@example.com" if "sns" in services else None
    package_dir = fake_package(tmp / "package", template, api_url)
    try:
        done = infra.deploy(
            aws,
            stage,
            StackParameters(secrets_path=path, alarm_email=email),
            package_dir=package_dir,
            timeout=DEADLINE_SECONDS,
            poll=0.5,
            site_dir=site(tmp / "site"),
            artifacts_bucket=artifacts,
        )
        yield Deployment(
            stage,
            infra.stack_name(stage),
            path,
            artifacts,
            services,
            aws,
            lambda_,
            done,
            api_url,
            package_dir,
        )
    finally:  # whatever the tests did, leave nothing behind
        stack = infra.describe_stack(aws.cloudformation, infra.stack_name(stage))
        audit_bucket = infra.stack_outputs(stack).get("AuditBucketName")
        if stack is not None:
            infra.destroy(
                aws,
                stage,
                secrets_path=path,
                confirm=None,
                remove_secrets=True,
                timeout=DEADLINE_SECONDS,
                poll=0.5,
                artifacts_bucket=artifacts,
            )
        names = [*SSM_SECRETS, *SSM_MIGRATION_SECRETS]
        aws.ssm.delete_parameters(Names=[infra.parameter_name(path, name) for name in names])
        if audit_bucket:  # retained by the stack (Object Lock); empty here, so it can go
            aws.s3.delete_bucket(Bucket=audit_bucket)


def test_the_stack_is_created_with_its_outputs(deployment: Deployment) -> None:
    stack = infra.describe_stack(deployment.aws.cloudformation, deployment.stack)
    assert stack is not None
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    parameters = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    assert parameters["SecretsParameterPath"] == deployment.secrets_path
    outputs = deployment.done.outputs
    assert {"StageQueueUrl", "StageDeadLetterQueueUrl", "DashboardBucketName"} <= set(outputs)
    assert deployment.done.api_url == deployment.api_url


def test_the_code_and_template_went_to_the_artifacts_bucket(deployment: Deployment) -> None:
    listed = deployment.aws.s3.list_objects_v2(Bucket=deployment.artifacts)["Contents"]
    keys = sorted(item["Key"] for item in listed)
    assert len(keys) == 2
    assert re.fullmatch(rf"{deployment.stage}/deployment-[0-9a-f]{{16}}\.zip", keys[0])
    assert re.fullmatch(rf"{deployment.stage}/template-[0-9a-f]{{16}}\.json", keys[1])


def test_the_stage_queue_redrives_to_its_dead_letter_queue(deployment: Deployment) -> None:
    sqs = client("sqs")
    outputs = deployment.done.outputs
    queue = sqs.get_queue_attributes(QueueUrl=outputs["StageQueueUrl"], AttributeNames=["All"])
    dlq = sqs.get_queue_attributes(
        QueueUrl=outputs["StageDeadLetterQueueUrl"], AttributeNames=["All"]
    )
    attributes, dead = queue["Attributes"], dlq["Attributes"]
    assert int(attributes["VisibilityTimeout"]) == 5400  # six times run_stage's 900 s
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == dead["QueueArn"]
    assert int(redrive["maxReceiveCount"]) == 5
    assert attributes["QueueArn"].endswith(f":maof-stage-queue-{deployment.stage[5:]}")
    assert int(dead["MessageRetentionPeriod"]) == 14 * 24 * 3600
    assert attributes["SqsManagedSseEnabled"] == "true"


def test_the_dashboard_bucket_is_private(deployment: Deployment) -> None:
    s3 = client("s3")
    bucket = deployment.done.outputs["DashboardBucketName"]
    with pytest.raises(s3.exceptions.ClientError, match="NoSuchWebsiteConfiguration"):
        s3.get_bucket_website(Bucket=bucket)
    blocked = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert blocked == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    ownership = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]
    assert ownership["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    # Without a distribution (none here) the deploy has no https URL to print.
    assert "DashboardDistributionId" not in deployment.done.outputs
    assert deployment.done.dashboard_url == ""


def test_the_dashboard_was_published_for_the_deployed_api(deployment: Deployment) -> None:
    s3 = client("s3")
    bucket = deployment.done.outputs["DashboardBucketName"]
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"index.html", "js/app.js", "config.json"}
    config = s3.get_object(Bucket=bucket, Key="config.json")
    assert json.loads(config["Body"].read()) == {"apiUrl": deployment.api_url}
    index = s3.get_object(Bucket=bucket, Key="index.html")
    assert index["ContentType"] == "text/html; charset=utf-8"
    script = s3.head_object(Bucket=bucket, Key="js/app.js")
    assert script["ContentType"] == "text/javascript; charset=utf-8"


def test_the_dead_letter_alarm_watches_the_dlq(deployment: Deployment) -> None:
    if "cloudwatch" not in deployment.services:
        pytest.skip(
            "this LocalStack runs without cloudwatch (stack.py starts it with it: "
            "`make down && make stack` to restart one started before)"
        )
    name = deployment.done.outputs["DeadLetterAlarmName"]
    alarms = client("cloudwatch").describe_alarms(AlarmNames=[name])["MetricAlarms"]
    assert len(alarms) == 1
    alarm = alarms[0]
    dlq_name = deployment.done.outputs["StageDeadLetterQueueUrl"].rsplit("/", 1)[1]
    assert alarm["Namespace"] == "AWS/SQS"
    assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": dlq_name}]
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["Threshold"] == 0
    if "sns" in deployment.services:
        topic = deployment.done.outputs["AlarmTopicArn"]
        assert alarm["AlarmActions"] == [topic]
        subscriptions = client("sns").list_subscriptions_by_topic(TopicArn=topic)
        assert [(s["Protocol"], s["Endpoint"]) for s in subscriptions["Subscriptions"]] == [
            ("email", "ops@example.com")
        ]


def test_the_deploy_ran_the_migrate_function_and_checked_health(deployment: Deployment) -> None:
    assert len(deployment.lambda_.invoked) == 1
    # The session's test database is already at head: nothing to do, said so.
    assert deployment.done.migration == {
        "migrated": False,
        "fromRevision": SCHEMA_REVISION,
        "toRevision": SCHEMA_REVISION,
    }
    assert deployment.done.health.startswith("ok ("), deployment.done.health


def test_a_second_deploy_changes_nothing_and_keeps_the_parameters(
    deployment: Deployment, tmp_path: Path
) -> None:
    again = infra.deploy(
        deployment.aws,
        deployment.stage,
        StackParameters(secrets_path=deployment.secrets_path),  # AlarmEmail: the previous
        package_dir=deployment.package_dir,
        timeout=DEADLINE_SECONDS,
        poll=0.5,
        site_dir=site(tmp_path / "site"),
        artifacts_bucket=deployment.artifacts,
    )
    assert again.outputs == deployment.done.outputs
    stack = infra.describe_stack(deployment.aws.cloudformation, deployment.stack)
    assert stack is not None
    assert stack["StackStatus"] == "CREATE_COMPLETE"  # no change set was executed
    assert len(deployment.lambda_.invoked) == 2  # migrations run on every deploy


def test_destroy_needs_the_stack_name_typed(deployment: Deployment) -> None:
    with pytest.raises(infra.DeployError, match="not confirmed"):
        infra.destroy(
            deployment.aws,
            deployment.stage,
            secrets_path=deployment.secrets_path,
            confirm=lambda question: "yes",
            artifacts_bucket=deployment.artifacts,
        )
    assert infra.describe_stack(deployment.aws.cloudformation, deployment.stack) is not None


def test_destroy_removes_the_stack_and_its_artifacts(deployment: Deployment) -> None:
    outputs = deployment.done.outputs
    questions: list[str] = []

    def confirm(question: str) -> str:
        questions.append(question)
        return deployment.stack

    infra.destroy(
        deployment.aws,
        deployment.stage,
        secrets_path=deployment.secrets_path,
        confirm=confirm,
        remove_secrets=True,
        timeout=DEADLINE_SECONDS,
        poll=0.5,
        artifacts_bucket=deployment.artifacts,
    )
    assert len(questions) == 1 and deployment.stack in questions[0]
    assert infra.describe_stack(deployment.aws.cloudformation, deployment.stack) is None
    s3, sqs = client("s3"), client("sqs")
    assert not infra.bucket_exists(s3, outputs["DashboardBucketName"])  # emptied, then deleted
    assert not infra.bucket_exists(s3, deployment.artifacts)
    for url in (outputs["StageQueueUrl"], outputs["StageDeadLetterQueueUrl"]):
        with pytest.raises(sqs.exceptions.QueueDoesNotExist):
            sqs.get_queue_url(QueueName=url.rsplit("/", 1)[1])
    assert infra.existing_parameters(deployment.aws.ssm, deployment.secrets_path) == {}
