"""infra/deploy.py where AWS would say no: the refusals and failure reports that the
LocalStack run (test_infra_localstack.py) cannot provoke. No service is called here."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from infra import deploy as infra
from infra.deploy import DeployError, StackParameters

pytestmark = pytest.mark.integration


def test_parameters_left_out_keep_their_previous_values_on_update() -> None:
    template_keys = ["SecretsParameterPath", "SubnetIds", "AlarmEmail", "NewInThisVersion"]
    given = {"SecretsParameterPath": "/maof/prod", "AlarmEmail": "ops@example.com"}
    previous = ["SecretsParameterPath", "SubnetIds", "AlarmEmail"]
    assert infra.stack_parameters(given, template_keys, previous) == [
        {"ParameterKey": "SecretsParameterPath", "ParameterValue": "/maof/prod"},
        {"ParameterKey": "SubnetIds", "UsePreviousValue": True},
        {"ParameterKey": "AlarmEmail", "ParameterValue": "ops@example.com"},
    ]  # a parameter new in this template takes its default
    assert infra.stack_parameters(given, template_keys, []) == [
        {"ParameterKey": "SecretsParameterPath", "ParameterValue": "/maof/prod"},
        {"ParameterKey": "AlarmEmail", "ParameterValue": "ops@example.com"},
    ]


def test_subnets_and_security_groups_go_together() -> None:
    with pytest.raises(DeployError, match="SUBNET_IDS and SECURITY_GROUP_IDS together"):
        StackParameters(secrets_path="/maof/prod", subnet_ids="subnet-1").given()
    both = StackParameters(
        secrets_path="/p", subnet_ids="subnet-1,subnet-2", security_group_ids="sg-1"
    )
    assert both.given() == {
        "SecretsParameterPath": "/p",
        "SubnetIds": "subnet-1,subnet-2",
        "SecurityGroupIds": "sg-1",
    }


def test_templates_are_read_from_the_regional_bucket_host_in_aws() -> None:
    s3 = boto3.client(
        "s3", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    assert (
        infra.object_url(s3, "maof-artifacts-1-eu-west-1", "prod/t.json")
        == "https://maof-artifacts-1-eu-west-1.s3.eu-west-1.amazonaws.com/prod/t.json"
    )
    local = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:4566",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    assert infra.object_url(local, "b", "k.json") == "http://127.0.0.1:4566/b/k.json"


def _package(tmp_path: Path, change: Any) -> Path:
    template = {
        "Resources": {
            "StageQueue": {
                "Type": "AWS::SQS::Queue",
                "Properties": {"QueueName": "maof-stage-queue"},
            },
            "RunStage": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    "CodeUri": "./deployment.zip",
                    "Role": {"Fn::GetAtt": ["RunStageRole", "Arn"]},
                    "Events": {
                        "Queue": {
                            "Type": "SQS",
                            "Properties": {
                                "Queue": {
                                    "Fn::Sub": "arn:${AWS::Partition}:sqs:${AWS::Region}:${AWS::AccountId}:maof-stage-queue"
                                }
                            },
                        }
                    },
                },
            },
        }
    }
    change(template["Resources"])
    (tmp_path / "sam.json").write_text(json.dumps(template))
    (tmp_path / "deployment.zip").write_bytes(b"PK")
    return tmp_path


def test_a_package_is_accepted_when_roles_and_queues_line_up(tmp_path: Path) -> None:
    infra.check_package(_package(tmp_path, lambda resources: None))


def test_a_function_left_with_chalices_placeholder_role_is_refused(tmp_path: Path) -> None:
    def placeholder(resources: dict[str, Any]) -> None:
        resources["RunStage"]["Properties"]["Role"] = "arn:aws:iam::000000000000:role/x"

    with pytest.raises(DeployError, match=r"function RunStage has no role in infra/template\.json"):
        infra.check_package(_package(tmp_path, placeholder))


def test_a_trigger_on_a_queue_the_template_lacks_is_refused(tmp_path: Path) -> None:
    def renamed(resources: dict[str, Any]) -> None:
        resources["StageQueue"]["Properties"]["QueueName"] = "another-queue"

    with pytest.raises(DeployError, match="a queue the template lacks"):
        infra.check_package(_package(tmp_path, renamed))


def test_no_package_no_deploy(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="run `make package`"):
        infra.check_package(tmp_path)


class FailingMigrate:
    def get_function_configuration(self, **params: Any) -> dict[str, Any]:
        return {"State": "Active", "LastUpdateStatus": "Successful"}

    def invoke(self, **params: Any) -> dict[str, Any]:
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
    with pytest.raises(DeployError) as caught:
        infra.invoke_migrate(FailingMigrate(), "maof-prod-Migrate", "/aws/lambda/maof-prod-migrate")
    message = str(caught.value)
    assert "(ConfigError): SSM parameter /maof/prod/jwt-secret is missing" in message
    assert "/aws/lambda/maof-prod-migrate" in message
    assert "\n" not in message


class StuckFunction(FailingMigrate):
    def get_function_configuration(self, **params: Any) -> dict[str, Any]:
        return {"State": "Failed", "StateReason": "The provided subnets have no free IP addresses"}


def test_a_function_that_cannot_start_is_reported() -> None:
    with pytest.raises(DeployError, match="failed to start: The provided subnets"):
        infra.invoke_migrate(StuckFunction(), "maof-prod-Migrate")


class RolledBack:
    """A stack whose create failed: CloudFormation's answers, in order."""

    def __init__(self) -> None:
        self.polls = 0

    def describe_stacks(self, StackName: str) -> dict[str, Any]:
        self.polls += 1
        status = "CREATE_IN_PROGRESS" if self.polls == 1 else "ROLLBACK_COMPLETE"
        return {"Stacks": [{"StackName": StackName, "StackStatus": status}]}

    def describe_stack_events(self, StackName: str) -> dict[str, Any]:
        events = [
            {"EventId": "3", "LogicalResourceId": StackName, "ResourceStatus": "ROLLBACK_COMPLETE"},
            {
                "EventId": "2",
                "LogicalResourceId": "DashboardBucketPolicy",
                "ResourceStatus": "CREATE_FAILED",
                "ResourceStatusReason": "Access Denied (Service: S3, Status Code: 403)",
            },
            {
                "EventId": "1",
                "LogicalResourceId": StackName,
                "ResourceStatus": "CREATE_IN_PROGRESS",
            },
        ]
        # Newest first, as CloudFormation lists them; one more is known after each poll.
        return {"StackEvents": events[3 - min(self.polls + 1, 3) :]}


def test_a_failed_stack_names_the_resource_and_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfn = RolledBack()
    events = infra._Events(cfn, "maof-prod", infra.say)
    with pytest.raises(DeployError) as caught:
        infra.wait_for_stack(cfn, "maof-prod", {"CREATE_COMPLETE"}, events=events, poll=0)
    assert str(caught.value) == (
        "stack maof-prod ended ROLLBACK_COMPLETE: "
        "DashboardBucketPolicy: Access Denied (Service: S3, Status Code: 403)"
    )
    printed = capsys.readouterr().out
    assert "DashboardBucketPolicy" in printed and "CREATE_FAILED" in printed


def test_a_stack_that_does_not_exist_is_none() -> None:
    class Missing:
        def describe_stacks(self, StackName: str) -> dict[str, Any]:
            error = {
                "Error": {
                    "Code": "ValidationError",
                    "Message": f"Stack with id {StackName} does not exist",
                }
            }
            raise ClientError(error, "DescribeStacks")

    assert infra.describe_stack(Missing(), "maof-prod") is None


def test_a_published_dashboard_is_invalidated_in_cloudfront() -> None:
    from botocore.stub import ANY, Stubber

    cloudfront = boto3.client(
        "cloudfront", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    with Stubber(cloudfront) as stub:
        stub.add_response(
            "create_invalidation",
            {"Location": "https://cloudfront/inv", "Invalidation": _invalidation("I2X")},
            {
                "DistributionId": "E1DIST",
                "InvalidationBatch": {
                    "Paths": {"Quantity": 1, "Items": ["/*"]},
                    "CallerReference": ANY,
                },
            },
        )
        assert infra.invalidate_dashboard(cloudfront, "E1DIST") == "I2X"
        stub.assert_no_pending_responses()


def _invalidation(identifier: str) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {
        "Id": identifier,
        "Status": "InProgress",
        "CreateTime": datetime(2026, 3, 1, tzinfo=UTC),
        "InvalidationBatch": {"Paths": {"Quantity": 1, "Items": ["/*"]}, "CallerReference": "r"},
    }
