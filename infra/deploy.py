"""The stack maof-<stage>: the AWS CLI packages and deploys it; this does what no tool does."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import requests
from botocore.config import Config
from botocore.exceptions import ClientError, WaiterError

from chalicelib.maintenance import REENCRYPT
from infra import DeployError, aws, say
from infra.secrets import all_parameters, require_secrets, retire_previous, rotate_key
from infra.site import publish_site

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "build" / "package"
# CAPABILITY_IAM: the template makes one IAM role per function; AUTO_EXPAND: the SAM transform.
CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"]
RECYCLE_VARIABLE = "MAOF_KEYS_ROTATED_AT"


@dataclass
class Stage:
    """A stage in an account and region: its stack, secrets and artifacts. boto3 and the AWS
    CLI find credentials, region and endpoint (AWS_ENDPOINT_URL: LocalStack) the usual way."""

    session: Any
    name: str
    secrets_path: str
    kms_key_id: str | None = None
    artifacts: str | None = None  # the bucket, when not maof-artifacts-<account>-<region>

    @property
    def stack(self) -> str:
        return f"maof-{self.name}"

    @cached_property
    def account(self) -> str:
        return str(self.session.client("sts").get_caller_identity()["Account"])

    @property
    def bucket(self) -> str:
        return self.artifacts or f"maof-artifacts-{self.account}-{self.session.region_name}"

    def client(self, service: str) -> Any:
        # The migrate function may run for its whole timeout (300 s): never invoke it twice.
        once = Config(read_timeout=360, retries={"total_max_attempts": 1})
        return self.session.client(service, config=once if service == "lambda" else None)

    def aws(self, *args: str, **options: Any) -> None:
        aws(*args, region=self.session.region_name, **options)

    def status(self) -> str | None:
        try:
            stack = self.client("cloudformation").describe_stacks(StackName=self.stack)
        except ClientError as exc:
            if "does not exist" in str(exc):
                return None
            raise
        return str(stack["Stacks"][0]["StackStatus"])

    def outputs(self) -> dict[str, str]:
        stack = self.client("cloudformation").describe_stacks(StackName=self.stack)["Stacks"][0]
        return {item["OutputKey"]: item["OutputValue"] for item in stack.get("Outputs", [])}

    def parameters(self) -> dict[str, str]:
        """The stack's parameters; none if it does not exist."""
        if self.status() is None:
            return {}
        stack = self.client("cloudformation").describe_stacks(StackName=self.stack)["Stacks"][0]
        return {item["ParameterKey"]: item["ParameterValue"] for item in stack["Parameters"]}

    def functions(self) -> list[str]:
        """The physical names of the stack's Lambda functions (every page of resources)."""
        pages = self.client("cloudformation").get_paginator("list_stack_resources")
        return sorted(
            str(resource["PhysicalResourceId"])
            for page in pages.paginate(StackName=self.stack)
            for resource in page["StackResourceSummaries"]
            if resource["ResourceType"] == "AWS::Lambda::Function"
        )

    def failures(self) -> list[str]:
        """The resources the stack's last operation failed on, with CloudFormation's reasons."""
        events = self.client("cloudformation").describe_stack_events(StackName=self.stack)
        found: list[str] = []
        for event in events["StackEvents"]:  # newest first
            reason = " ".join(str(event.get("ResourceStatusReason") or "").split())
            if event["LogicalResourceId"] == self.stack and reason == "User Initiated":
                break
            if event["ResourceStatus"].endswith("FAILED") and reason:
                found.insert(0, f"{event['LogicalResourceId']}: {reason}")
        return found

    def delete(self, poll: float) -> None:
        """Delete the stack and wait, up to an hour (functions in a VPC release their network
        interfaces slowly)."""
        cfn = self.client("cloudformation")
        cfn.delete_stack(StackName=self.stack)
        try:
            config = {"Delay": poll, "MaxAttempts": int(3600 / poll)}
            cfn.get_waiter("stack_delete_complete").wait(StackName=self.stack, WaiterConfig=config)
        except WaiterError as exc:
            raise DeployError(f"stack {self.stack}: {'; '.join(self.failures()) or exc}") from None

    def migrate(self, event: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Invoke the `migrate` function (an Alembic upgrade, or an action of
        chalicelib/maintenance.py) once it is Active and not mid-update; wait for its answer."""
        function, lambda_ = self.outputs()["MigrateFunctionName"], self.client("lambda")
        wait_function(lambda_, function)
        response = lambda_.invoke(FunctionName=function, Payload=json.dumps(dict(event or {})))
        answer = json.loads(response["Payload"].read() or b"null")
        if response.get("FunctionError") or not isinstance(answer, dict):
            error = answer if isinstance(answer, dict) else {"errorMessage": answer}
            detail = " ".join(str(error["errorMessage"]).split())
            raise DeployError(
                f"the migrate function failed ({error.get('errorType', 'error')}): {detail} "
                f"(more in /aws/lambda/{self.stack}-migrate)"
            )
        return answer


def wait_function(lambda_: Any, function: str) -> None:
    """Until the function is Active and not mid-update (in a VPC that takes a while)."""
    for waiter in ("function_active", "function_updated"):
        try:
            lambda_.get_waiter(waiter).wait(FunctionName=function)
        except WaiterError as exc:
            last = exc.last_response or {}
            reason = last.get("StateReason") or last.get("LastUpdateStatusReason") or exc
            raise DeployError(f"function {function} failed to start: {reason}") from None


def recycle_functions(lambda_: Any, functions: list[str], stamp: str) -> None:
    """New execution environments for each function: a configuration change (one variable
    set to `stamp`) makes Lambda start fresh containers, which read SSM again."""
    for function in functions:
        wait_function(lambda_, function)
        config = lambda_.get_function_configuration(FunctionName=function)
        variables = (config.get("Environment") or {}).get("Variables", {})
        lambda_.update_function_configuration(
            FunctionName=function, Environment={"Variables": {**variables, RECYCLE_VARIABLE: stamp}}
        )
        wait_function(lambda_, function)


def check_health(api_url: str) -> str:
    """GET /health once (a cold start in a VPC reads SSM first: allow it time); 503 says why."""
    try:
        response = requests.get(f"{api_url}/health", timeout=30)
    except requests.RequestException as exc:
        return f"no answer ({exc})"
    try:
        data = response.json()["data"]
        return f"{data['status']} ({', '.join(f'{k} {v}' for k, v in data['services'].items())})"
    except (ValueError, KeyError, TypeError):
        return f"unexpected answer {response.text[:200]!r}"


def release_audit_bucket_policy(stage: Stage, overrides: Sequence[str]) -> Callable[[], None]:
    """Before the stack takes on an audit bucket an earlier stack left (ExistingAuditBucketName
    other than the stack's own value): delete the policy that stack kept on it (DeletionPolicy:
    Retain), as CloudFormation creates no bucket policy where one exists. The stack's own
    policy, which waits on no other resource, replaces it early in the create. Returns what
    puts the kept policy back, should the stack fail: the bucket is never left without one."""
    key = "ExistingAuditBucketName="
    given = next((item[len(key) :] for item in overrides if item.startswith(key)), "")
    if not given or stage.parameters().get("ExistingAuditBucketName") == given:
        return lambda: None
    s3 = stage.client("s3")
    try:
        kept = s3.get_bucket_policy(Bucket=given)["Policy"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchBucketPolicy", "NoSuchBucket"):
            return lambda: None  # nothing to delete (no such bucket: the stack says so)
        raise
    s3.delete_bucket_policy(Bucket=given)
    say(
        f"audit bucket {given}: deleted the policy an earlier stack left, for this one to put its own"
    )

    def restore() -> None:
        s3.put_bucket_policy(Bucket=given, Policy=kept)
        say(f"audit bucket {given}: put back the policy the earlier stack left")

    return restore


def deploy(stage: Stage, overrides: Sequence[str] = (), package_dir: Path = PACKAGE_DIR) -> str:
    """`make deploy` after `make package`: the secrets, the stack (by the AWS CLI), the
    migrations, the dashboard; returns what /health says. Stack parameters left out of
    `overrides` (KEY=VALUE) keep their values on an update."""
    keys = {item.split("=", 1)[0] for item in overrides}
    if ("SubnetIds" in keys) != ("SecurityGroupIds" in keys):
        raise DeployError("give SUBNET_IDS and SECURITY_GROUP_IDS together (or neither)")
    if not (package_dir / "sam.json").exists():
        raise DeployError(f"{package_dir} holds no chalice package: run `make package`")
    say(f"account {stage.account}, region {stage.session.region_name}, stack {stage.stack}")
    require_secrets(stage.client("ssm"), stage.secrets_path, stage.name, stage.kms_key_id)
    if not stage.session.resource("s3").Bucket(stage.bucket).creation_date:
        stage.aws("s3", "mb", f"s3://{stage.bucket}", quiet=False)  # private: S3's default
    if stage.status() == "ROLLBACK_COMPLETE":  # a failed create can only be deleted
        say(f"stack {stage.stack} is ROLLBACK_COMPLETE (its create failed): deleting it first")
        stage.delete(poll=5)
    template = str(package_dir / "packaged.json")
    store = ["--s3-bucket", stage.bucket, "--s3-prefix", stage.name]
    source = ["--template-file", str(package_dir / "sam.json"), "--output-template-file", template]
    stage.aws("cloudformation", "package", *source, *store, "--use-json")
    say(f"aws cloudformation package: the code is in s3://{stage.bucket}/{stage.name}/")
    changes = ["--template-file", template, "--stack-name", stage.stack, *store]
    changes += ["--capabilities", *CAPABILITIES, "--no-fail-on-empty-changeset"]
    changes += ["--parameter-overrides", f"SecretsParameterPath={stage.secrets_path}", *overrides]
    restore_policy = release_audit_bucket_policy(stage, overrides)
    try:
        stage.aws("cloudformation", "deploy", *changes, quiet=False)
    except DeployError:
        restore_policy()
        causes = "; ".join(stage.failures() if stage.status() else []) or "see above"
        raise DeployError(f"stack {stage.stack} failed: {causes}") from None
    migration = stage.migrate()
    say(
        f"migrate: database at {migration['toRevision']} (was {migration['fromRevision'] or 'empty'})"
    )
    outputs = stage.outputs()
    api_url, site = outputs["EndpointURL"].rstrip("/"), outputs["DashboardBucketName"]
    publish_site(stage.aws, site, api_url)
    say(f"dashboard: published to s3://{site}")
    if distribution := outputs.get("DashboardDistributionId"):  # one path: billed by path
        paths = {"Paths": {"Quantity": 1, "Items": ["/*"]}, "CallerReference": str(time.time())}
        stage.client("cloudfront").create_invalidation(
            DistributionId=distribution, InvalidationBatch=paths
        )
        say(f"dashboard: CloudFront drops its copies of /* in {distribution} within minutes")
    say(f"GET /health: {(health := check_health(api_url))}")
    return health


def rotate(stage: Stage, command: str, key: str) -> None:
    """`make rotate-key` / `make retire-keys`: the values in SSM, then new execution
    environments for every function (one environment variable changed), so that no warm
    container keeps old keys; for secret-key, the agent tokens re-encrypted."""
    if stage.status() is None:
        raise DeployError(f"stack {stage.stack} does not exist: deploy it first")
    ssm, path = stage.client("ssm"), stage.secrets_path
    if command == "rotate-key":
        kept = rotate_key(ssm, path, key, stage.kms_key_id)
        say(f"{path}/{key}: a new value; {len(kept)} previous kept")
    else:
        retired = retire_previous(ssm, path, key)
        say(f"{path}/{key}: {'previous values deleted' if retired else 'nothing to retire'}")
    functions = stage.functions()
    recycle_functions(stage.client("lambda"), functions, time.strftime("%Y-%m-%dT%H:%M:%SZ"))
    say(f"functions recycled: {', '.join(functions) or 'none'}")
    if command == "rotate-key" and key == "secret-key":
        answer = stage.migrate({"action": REENCRYPT})
        say(
            "agent tokens and callback secrets re-encrypted with the new key: "
            f"{answer['reencrypted']}"
        )
        if answer.get("unreadable"):
            say(
                f"{answer['unreadable']} secrets no key can read were left as they are "
                "(the migrate function's log names them)"
            )


def destroy(
    stage: Stage,
    confirm: Callable[[str], str] | None,
    remove_secrets: bool = False,
    poll: float = 15,
) -> None:
    """Empty the dashboard bucket, delete the stack, then this stage's artifacts (and its
    secrets if asked); `confirm` None means already confirmed."""
    s3, region = stage.session.resource("s3"), stage.session.region_name
    where = f"account {stage.account}, region {region}"
    audit = None
    if stage.status() is None:
        say(f"stack {stage.stack} does not exist in {where}")
    else:
        question = f"Delete stack {stage.stack} in {where} (API, functions, queues and their "
        question += f"messages, dashboard, logs)? Type {stage.stack} to confirm: "
        if confirm is not None and confirm(question).strip() != stage.stack:
            raise DeployError("not confirmed; nothing was deleted")
        dashboard = stage.outputs().get("DashboardBucketName")
        if dashboard and s3.Bucket(dashboard).creation_date:  # CloudFormation deletes it empty
            s3.Bucket(dashboard).object_versions.delete()
            say(f"emptied the dashboard bucket {dashboard}")
        audit = stage.outputs().get("AuditBucketName")
        say(f"deleting stack {stage.stack} (its audit bucket stays: Object Lock holds it)")
        stage.delete(poll)
    artifacts = s3.Bucket(stage.bucket)
    if artifacts.creation_date:
        artifacts.objects.filter(Prefix=f"{stage.name}/").delete()
        if not list(artifacts.objects.limit(1)):  # no other stage's either
            artifacts.delete()
        say(f"deleted the artifacts of {stage.name} in {artifacts.name}")
    if remove_secrets:
        deleted = stage.client("ssm").delete_parameters(Names=all_parameters(stage.secrets_path))
        say(f"deleted the SSM parameters {', '.join(deleted['DeletedParameters']) or '(none)'}")
    else:
        say(
            f"kept the SSM parameters under {stage.secrets_path} (secret-key decrypts the agent "
            f"tokens in your database): `make destroy STAGE={stage.name} DELETE_SECRETS=1` "
            "deletes them"
        )
    say("your Postgres and Redis were not touched")
    if audit:
        # A new stack would make a new bucket, where no earlier checkpoint is: every run
        # checkpointed before would read as tampered with.
        say(
            f"kept the audit bucket {audit}: deploy this stage again with "
            f"`make deploy STAGE={stage.name} AUDIT_BUCKET={audit}` so the runs checkpointed "
            "so far still verify"
        )
