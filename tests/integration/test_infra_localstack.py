"""`make deploy`, `make rotate-key` and `make destroy` against LocalStack's CloudFormation,
end to end, with the AWS CLI (`aws cloudformation package` and `deploy`) as in AWS.

LocalStack (community) runs no Lambda functions, API Gateway or CloudFront here, so the
stack is the infrastructure-only part of infra/template.json: every resource of a service
LocalStack serves (the stage queue and its dead-letter queue, the private dashboard bucket,
the audit bucket and its policy, the dead-letter alarm and its SNS topic when LocalStack runs cloudwatch
and sns), under a stack name of its own, from which every name derives. The CloudFront
distribution, its policies and the bucket policy naming it are left out with the rest they
refer to (test_package.py checks them in the packaged template). The AWS CLI and boto3 reach
LocalStack through AWS_ENDPOINT_URL, with dummy credentials. Lambda and CloudFront are stood
in for in this process (tests/support/aws.py): the `migrate` function runs through Chalice's
test client, and the invalidation is recorded; the API whose /health the deploy asks is the
local server the integration tests use.

The first deploy is of a package whose create fails (a bucket name S3 refuses): the deploy
names the resource and the reason, and the next deploy deletes the rolled-back stack and
creates it anew. The tests read the resources back, redeploy (no changes), rotate a key,
and `destroy` removes everything but the audit bucket and its policy, which the stage
deployed again takes back.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.waiter
import pytest
from botocore.exceptions import ClientError

from chalicelib.config import get_settings
from chalicelib.db import SCHEMA_REVISION
from chalicelib.engine.queue import MAX_RECEIVES
from infra import DeployError
from infra.deploy import Stage, deploy, destroy, rotate
from infra.secrets import all_parameters, ensure_secrets
from tests.support.aws import Calls, answer_calls
from tests.support.quick_waiters.sitecustomize import quick
from tests.support.site import JAVASCRIPT, site_keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROJECT_DIR = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
QUICK_WAITERS = str(PROJECT_DIR / "tests" / "support" / "quick_waiters")
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
            elif key == "Fn::Sub":  # its own variables (a second argument) are no references
                text, variables = (value, {}) if isinstance(value, str) else value
                named = {m.split(".")[0] for m in re.findall(r"\$\{([^!}][^}]*)\}", text)}
                found |= (named - set(variables)) | references(variables)
            else:
                found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def infrastructure_template(template: dict[str, Any], services: set[str]) -> dict[str, Any]:
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


def migrate_in_process(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    """Lambda's answers for the deploy's calls: the function is ready, and an invocation runs
    the app's `migrate` function here."""
    from chalice.test import Client

    import app as maof

    assert params["FunctionName"] == "maof-test-migrate"
    if operation == "GetFunctionConfiguration":
        return {
            "FunctionName": params["FunctionName"],
            "State": "Active",
            "LastUpdateStatus": "Successful",
        }
    assert operation == "Invoke"
    with Client(maof.app, project_dir=str(PROJECT_DIR)) as lambda_client:
        payload = lambda_client.lambda_.invoke("migrate", json.loads(params["Payload"]))
    return {"StatusCode": 200, "Payload": io.BytesIO(json.dumps(payload.payload).encode())}


def invalidated(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    assert operation == "CreateInvalidation"
    batch = params["InvalidationBatch"]
    return {
        "Invalidation": {
            "Id": "I2TEST",
            "Status": "InProgress",
            "CreateTime": "2026-03-01T10:00:00Z",
            "InvalidationBatch": batch,
        }
    }


def fake_package(directory: Path, template: dict[str, Any], api_url: str) -> Path:
    """What `make package` would leave, for a stack without functions, API or distribution:
    the outputs the deploy reads from those are given literally."""
    directory.mkdir()
    template = {
        **template,
        "Outputs": {
            **template["Outputs"],
            "EndpointURL": {"Value": f"{api_url}/"},
            "MigrateFunctionName": {"Value": "maof-test-migrate"},
            "DashboardDistributionId": {"Value": "E2TESTDIST"},
            "DashboardURL": {"Value": "https://d111111abcdef8.cloudfront.net/"},
        },
    }
    (directory / "sam.json").write_text(json.dumps(template))
    with zipfile.ZipFile(directory / "deployment.zip", "w") as archive:
        archive.writestr("app.py", "# the code is not run by LocalStack\n")
    return directory


def broken(template: dict[str, Any]) -> dict[str, Any]:
    """A stack whose create fails: one bucket, with a name S3 refuses."""
    bad = {"Type": "AWS::S3::Bucket", "Properties": {"BucketName": "Not_A_Valid..Bucket"}}
    return {**template, "Resources": {"BrokenBucket": bad}, "Outputs": {}}


@dataclass
class Deployment:
    stage: Stage
    services: set[str]
    lambda_: Calls
    cloudfront: Calls
    health: str
    failed: str
    printed: str
    api_url: str
    package_dir: Path
    audit_bucket: str  # the stack's own, which outlives it

    @property
    def outputs(self) -> dict[str, str]:
        return self.stage.outputs()


@pytest.fixture(scope="module")
def deployment(api_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    services = localstack_services()
    if "cloudformation" not in services:
        pytest.skip("LocalStack runs without cloudformation")
    name = f"test-{uuid.uuid4().hex[:8]}"
    template = infrastructure_template(
        json.loads((PROJECT_DIR / "infra" / "template.json").read_text()), services
    )
    tmp = tmp_path_factory.mktemp("deploy")
    with pytest.MonkeyPatch.context() as env:
        # What a developer would export to point the AWS CLI and boto3 at LocalStack.
        env.setenv("AWS_ENDPOINT_URL", endpoint())
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.delenv("AWS_PROFILE", raising=False)
        # The waiters poll every second, here and in the AWS CLI's processes (its deploy
        # looks every 30 s; LocalStack is done in one or two).
        env.setenv("MAOF_TEST_WAITER_DELAY", "1")
        env.setenv(
            "PYTHONPATH",
            os.pathsep.join(filter(None, [QUICK_WAITERS, os.environ.get("PYTHONPATH")])),
        )
        env.setattr(botocore.waiter.Waiter, "wait", quick(botocore.waiter.Waiter.wait, 1))
        session = boto3.session.Session(region_name=REGION)
        lambda_ = answer_calls(session.events, "lambda", migrate_in_process)
        cloudfront = answer_calls(session.events, "cloudfront", invalidated)
        stage = Stage(session, name, f"/maof-test/{name}", artifacts=f"maof-test-artifacts-{name}")
        settings = get_settings()
        urls = {
            "database-url": settings.database_url,
            "migration-database-url": settings.migration_database_url,
            "redis-url": settings.redis_url,
        }
        ensure_secrets(session.client("ssm"), stage.secrets_path, urls=urls)  # `make secrets`
        email = ["AlarmEmail=ops@example.com"] if "sns" in services else []
        audit = None
        try:
            with pytest.raises(DeployError) as failure:
                deploy(
                    stage,
                    email,
                    package_dir=fake_package(tmp / "broken", broken(template), api_url),
                )
            package_dir = fake_package(tmp / "package", template, api_url)
            with capture() as printed:
                health = deploy(stage, email, package_dir=package_dir)
            audit = stage.outputs()["AuditBucketName"]
            yield Deployment(
                stage,
                services,
                lambda_,
                cloudfront,
                health,
                str(failure.value),
                printed.getvalue(),
                api_url,
                package_dir,
                audit,
            )
        finally:  # whatever the tests did, leave nothing behind
            if stage.status() is not None:
                destroy(stage, confirm=None, remove_secrets=True, poll=1)
            if audit and session.resource("s3").Bucket(audit).creation_date:
                # Retained by the stack (Object Lock); empty here, so it can go.
                session.client("s3").delete_bucket(Bucket=audit)
            session.client("ssm").delete_parameters(Names=all_parameters(stage.secrets_path))


@contextlib.contextmanager
def capture() -> Iterator[io.StringIO]:
    """What the deploy prints itself (the AWS CLI's own output goes to the terminal)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        yield printed


def test_a_failed_create_names_the_resource_and_the_next_deploy_starts_again(
    deployment: Deployment,
) -> None:
    assert deployment.failed.startswith(f"stack {deployment.stage.stack} failed: BrokenBucket: ")
    assert "InvalidBucketName" in deployment.failed
    assert "is ROLLBACK_COMPLETE (its create failed): deleting it first" in deployment.printed


def test_the_stack_is_created_with_its_outputs(deployment: Deployment) -> None:
    cfn = deployment.stage.client("cloudformation")
    stack = cfn.describe_stacks(StackName=deployment.stage.stack)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    parameters = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    assert parameters["SecretsParameterPath"] == deployment.stage.secrets_path
    assert {"StageQueueUrl", "StageDeadLetterQueueUrl", "DashboardBucketName"} <= set(
        deployment.outputs
    )
    assert f"stack {deployment.stage.stack}" in deployment.printed


def test_the_template_went_to_the_artifacts_bucket_under_the_stage(deployment: Deployment) -> None:
    listed = client("s3").list_objects_v2(Bucket=deployment.stage.bucket)["Contents"]
    keys = sorted(item["Key"] for item in listed)
    # `aws cloudformation deploy` uploads the template by its MD5; the package has no code
    # (no functions here): test_package.py checks the code's upload.
    assert keys
    assert all(re.fullmatch(rf"{deployment.stage.name}/[0-9a-f]{{32}}\.template", k) for k in keys)


def test_the_stage_queue_is_named_after_the_stack_and_redrives(deployment: Deployment) -> None:
    sqs = client("sqs")
    outputs = deployment.outputs
    queue = sqs.get_queue_attributes(QueueUrl=outputs["StageQueueUrl"], AttributeNames=["All"])
    dlq = sqs.get_queue_attributes(
        QueueUrl=outputs["StageDeadLetterQueueUrl"], AttributeNames=["All"]
    )
    attributes, dead = queue["Attributes"], dlq["Attributes"]
    assert int(attributes["VisibilityTimeout"]) == 5400  # six times run_stage's 900 s
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == dead["QueueArn"]
    assert int(redrive["maxReceiveCount"]) == MAX_RECEIVES
    assert attributes["QueueArn"].endswith(f":{deployment.stage.stack}-stage-queue")
    assert dead["QueueArn"].endswith(f":{deployment.stage.stack}-stage-queue-dlq")
    assert int(dead["MessageRetentionPeriod"]) == 14 * 24 * 3600
    assert attributes["SqsManagedSseEnabled"] == "true"


def test_the_dashboard_bucket_is_private(deployment: Deployment) -> None:
    s3 = client("s3")
    bucket = deployment.outputs["DashboardBucketName"]
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


def test_the_dashboard_was_published_for_the_deployed_api(deployment: Deployment) -> None:
    s3 = client("s3")
    bucket = deployment.outputs["DashboardBucketName"]
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {*site_keys(), "config.json"}
    config = s3.get_object(Bucket=bucket, Key="config.json")
    assert json.loads(config["Body"].read()) == {"apiUrl": deployment.api_url}
    index = s3.get_object(Bucket=bucket, Key="index.html")
    assert index["ContentType"] == "text/html"
    script = next(key for key in keys if key.endswith(".js"))
    assert s3.head_object(Bucket=bucket, Key=script)["ContentType"] in JAVASCRIPT


def test_cloudfront_is_told_to_drop_its_copies_of_the_site(deployment: Deployment) -> None:
    [invalidation] = deployment.cloudfront.of("CreateInvalidation")
    assert invalidation["DistributionId"] == "E2TESTDIST"
    assert invalidation["InvalidationBatch"]["Paths"] == {"Quantity": 1, "Items": ["/*"]}


def test_the_dead_letter_alarm_watches_the_dlq(deployment: Deployment) -> None:
    if "cloudwatch" not in deployment.services:
        pytest.skip(
            "this LocalStack runs without cloudwatch (stack.py starts it with it: "
            "`make down && make stack` to restart one started before)"
        )
    name = deployment.outputs["DeadLetterAlarmName"]
    alarms = client("cloudwatch").describe_alarms(AlarmNames=[name])["MetricAlarms"]
    assert len(alarms) == 1
    alarm = alarms[0]
    dlq_name = deployment.outputs["StageDeadLetterQueueUrl"].rsplit("/", 1)[1]
    assert alarm["Namespace"] == "AWS/SQS"
    assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": dlq_name}]
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["Threshold"] == 0
    if "sns" in deployment.services:
        topic = deployment.outputs["AlarmTopicArn"]
        assert alarm["AlarmActions"] == [topic]
        subscriptions = client("sns").list_subscriptions_by_topic(TopicArn=topic)
        assert [(s["Protocol"], s["Endpoint"]) for s in subscriptions["Subscriptions"]] == [
            ("email", "ops@example.com")
        ]


def test_the_deploy_ran_the_migrate_function_and_checked_health(deployment: Deployment) -> None:
    assert len(deployment.lambda_.of("Invoke")) == 1
    # The session's test database is already at head: nothing to do, said so.
    assert f"migrate: database at {SCHEMA_REVISION} (was {SCHEMA_REVISION})" in deployment.printed
    assert deployment.health.startswith("ok ("), deployment.health


def test_a_second_deploy_changes_nothing_and_keeps_the_parameters(
    deployment: Deployment,
) -> None:
    outputs = deployment.outputs
    deploy(deployment.stage, [], package_dir=deployment.package_dir)  # AlarmEmail: the previous
    assert deployment.outputs == outputs
    cfn = deployment.stage.client("cloudformation")
    stack = cfn.describe_stacks(StackName=deployment.stage.stack)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE"  # no change set was executed
    parameters = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    if "sns" in deployment.services:
        assert parameters["AlarmEmail"] == "ops@example.com"
    assert len(deployment.lambda_.of("Invoke")) == 2  # migrations run on every deploy


def test_rotating_the_secret_key_reencrypts_the_agent_tokens(deployment: Deployment) -> None:
    ssm, path = deployment.stage.client("ssm"), deployment.stage.secrets_path
    before = ssm.get_parameter(Name=f"{path}/secret-key", WithDecryption=True)["Parameter"]["Value"]
    rotate(deployment.stage, "rotate-key", "secret-key")
    previous = ssm.get_parameter(Name=f"{path}/previous-secret-keys", WithDecryption=True)
    assert previous["Parameter"]["Value"] == before
    assert json.loads(deployment.lambda_.of("Invoke")[-1]["Payload"]) == {
        "action": "reencrypt-agent-tokens"
    }
    rotate(deployment.stage, "retire-keys", "secret-key")
    assert not ssm.get_parameters(Names=[f"{path}/previous-secret-keys"])["Parameters"]


# What the audit bucket's policy holds (test_package.py checks each statement).
AUDIT_POLICY_STATEMENTS = [
    "WriteEachCheckpointKeyOnce",
    "NoDeleteMarkersUnderCheckpoints",
    "RefuseRequestsWithoutTls",
]


def audit_policy_statements(bucket: str) -> list[str]:
    """The Sids of `bucket`'s policy; none without one."""
    try:
        policy = client("s3").get_bucket_policy(Bucket=bucket)["Policy"]
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "NoSuchBucketPolicy", exc
        return []
    return [statement["Sid"] for statement in json.loads(policy)["Statement"]]


def test_destroy_needs_the_stack_name_typed(deployment: Deployment) -> None:
    with pytest.raises(DeployError, match="not confirmed"):
        destroy(deployment.stage, confirm=lambda question: "yes")
    assert deployment.stage.status() is not None


def test_destroy_removes_the_stack_and_its_artifacts(deployment: Deployment) -> None:
    outputs = deployment.outputs
    questions: list[str] = []

    def confirm(question: str) -> str:
        questions.append(question)
        return deployment.stage.stack

    with capture() as printed:
        destroy(deployment.stage, confirm, remove_secrets=True, poll=1)
    assert len(questions) == 1 and deployment.stage.stack in questions[0]
    # How to deploy the stage again on the bucket its checkpoints are in.
    again = f"make deploy STAGE={deployment.stage.name} AUDIT_BUCKET={outputs['AuditBucketName']}"
    assert again in printed.getvalue()
    assert deployment.stage.status() is None
    s3, sqs = deployment.stage.session.resource("s3"), client("sqs")
    assert not s3.Bucket(outputs["DashboardBucketName"]).creation_date  # emptied, then deleted
    assert not s3.Bucket(deployment.stage.bucket).creation_date
    # Kept, Object Lock holding its checkpoints, and with it its policy: the write-once
    # rule and TLS only.
    assert s3.Bucket(deployment.audit_bucket).creation_date
    assert audit_policy_statements(deployment.audit_bucket) == AUDIT_POLICY_STATEMENTS
    for url in (outputs["StageQueueUrl"], outputs["StageDeadLetterQueueUrl"]):
        with pytest.raises(sqs.exceptions.QueueDoesNotExist):
            sqs.get_queue_url(QueueName=url.rsplit("/", 1)[1])
    ssm = deployment.stage.client("ssm")
    assert (
        ssm.get_parameters(Names=all_parameters(deployment.stage.secrets_path))["Parameters"] == []
    )


def test_the_stage_deployed_again_on_its_audit_bucket_puts_its_own_policy_there(
    deployment: Deployment,
) -> None:
    """After `make destroy` (the test above): `make secrets`, then `make deploy
    AUDIT_BUCKET=<the bucket kept>`. The policy the destroyed stack left is deleted first
    (CloudFormation creates no bucket policy where one exists; LocalStack's would overwrite
    it), and the new stack puts its own; deployed again, the stack's own is left alone."""
    assert deployment.stage.status() is None
    settings, bucket = get_settings(), deployment.audit_bucket
    urls = {
        "database-url": settings.database_url,
        "migration-database-url": settings.migration_database_url,
        "redis-url": settings.redis_url,
    }
    ensure_secrets(deployment.stage.client("ssm"), deployment.stage.secrets_path, urls=urls)
    given = [f"ExistingAuditBucketName={bucket}"]
    released = f"audit bucket {bucket}: deleted the policy an earlier stack left"
    for first in (True, False):
        with capture() as printed:
            deploy(deployment.stage, given, package_dir=deployment.package_dir)
        assert (released in printed.getvalue()) is first
        assert deployment.outputs["AuditBucketName"] == bucket
        assert audit_policy_statements(bucket) == AUDIT_POLICY_STATEMENTS


def test_a_failed_deploy_onto_a_kept_audit_bucket_puts_its_policy_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make deploy AUDIT_BUCKET=` deletes the policy the destroyed stack left just before
    `cloudformation deploy`; when that failed, the bucket was left with no policy at all
    (no write-once rule, no TLS-only) until a deploy succeeded. It is put back."""
    from infra import deploy as deploy_module

    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint())
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3, bucket = client("s3"), f"maof-kept-audit-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    kept = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "RefuseRequestsWithoutTls",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{bucket}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(kept))
    name = f"kept-{uuid.uuid4().hex[:6]}"
    stage = Stage(boto3.session.Session(region_name=REGION), name, f"/maof-test/{name}")
    (tmp_path / "sam.json").write_text("{}")
    monkeypatch.setattr(deploy_module, "require_secrets", lambda *args, **kwargs: None)

    def aws(self: Stage, *args: str, **options: Any) -> None:
        if args[:2] == ("cloudformation", "deploy"):
            raise DeployError("aws cloudformation deploy failed: see above")

    monkeypatch.setattr(Stage, "aws", aws)
    monkeypatch.setattr(Stage, "bucket", property(lambda self: bucket))  # no artifacts bucket
    try:
        with pytest.raises(DeployError, match=f"stack maof-{name} failed"):
            deploy(stage, [f"ExistingAuditBucketName={bucket}"], package_dir=tmp_path)
        assert audit_policy_statements(bucket) == ["RefuseRequestsWithoutTls"]
    finally:
        s3.delete_bucket_policy(Bucket=bucket)
        s3.delete_bucket(Bucket=bucket)
