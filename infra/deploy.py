"""`make deploy`, `make destroy`, `make secrets`: MAOF in an AWS account with boto3 alone.

No AWS CLI or SAM CLI is needed; credentials and region come the usual boto3 way
(AWS_PROFILE / AWS_ACCESS_KEY_ID…, AWS_REGION or the profile's region).

deploy   1. checks the SSM parameters the functions read at cold start, generating the two
            random secrets (jwt-secret, secret-key) when missing;
         2. `chalice package --stage STAGE --merge-template infra/template.json build/package`;
         3. uploads the code zip and the template to an artifacts bucket
            (maof-artifacts-<account>-<region>), rewriting each function's CodeUri, as
            `aws cloudformation package` would;
         4. creates or updates the stack `maof-<stage>` through a change set and waits for it,
            printing the stack events;
         5. invokes the `migrate` function (Alembic upgrade to head);
         6. publishes dashboard/ to the stack's private bucket with a config.json naming the
            API, and invalidates the CloudFront distribution in front of it;
         7. calls GET /health and prints the API and dashboard (https) URLs.
destroy  empties the dashboard bucket, deletes the stack and this stage's artifacts; keeps
         the SSM parameters unless asked, and never touches the database or Redis.
secrets  creates the SecureString parameters (asks for the database and Redis URLs).
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import secrets as random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from chalicelib.audit.keys import new_key_set
from chalicelib.config import SSM_MIGRATION_SECRETS, SSM_SECRETS

PROJECT_DIR = Path(__file__).resolve().parents[1]
MERGE_TEMPLATE = "infra/template.json"
DEFAULT_PACKAGE_DIR = PROJECT_DIR / "build" / "package"
SITE_DIR = PROJECT_DIR / "dashboard"
# CAPABILITY_IAM: the template makes one IAM role per function; AUTO_EXPAND: the SAM transform.
CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"]
# Made here, never asked for: random secrets, and the Ed25519 key set that signs the audit.
GENERATED_SECRETS: dict[str, Callable[[], str]] = {
    "jwt-secret": lambda: random.token_urlsafe(48),
    "secret-key": lambda: random.token_urlsafe(48),
    "audit-signing-key": new_key_set,
}
URL_SECRETS = {
    # The application's role (INSERT and SELECT only on the audit trail) and the owner's,
    # which only the migrate function reads (README "The audit trail").
    "database-url": ("postgresql://", "postgresql+psycopg://"),
    "migration-database-url": ("postgresql://", "postgresql+psycopg://"),
    "redis-url": ("redis://", "rediss://"),
}
STACK_TIMEOUT_SECONDS = 45 * 60
CHANGE_SET_TIMEOUT_SECONDS = 10 * 60
FUNCTION_READY_TIMEOUT_SECONDS = 10 * 60

Say = Callable[[str], None]
Ask = Callable[[str], str]


class DeployError(Exception):
    """Deployment cannot go on; the message (one line) says why and what to do."""


def say(message: str) -> None:
    print(f"deploy: {message}", flush=True)


def stack_name(stage: str) -> str:
    return f"maof-{stage}"


def default_secrets_path(stage: str) -> str:
    return f"/maof/{stage}"


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _error_message(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return " ".join(str(response.get("Error", {}).get("Message", exc)).split())


# ---------------------------------------------------------------- AWS clients


@dataclass
class Aws:
    """The clients deploy and destroy use (tests pass LocalStack or stubbed ones)."""

    region: str
    cloudformation: Any
    s3: Any
    ssm: Any
    lambda_: Any
    sts: Any
    cloudfront: Any = None

    @classmethod
    def connect(cls, region: str | None = None) -> Aws:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        try:
            # boto3 reads AWS_DEFAULT_REGION and the profile; AWS_REGION is honoured here too.
            region = region or os.environ.get("AWS_REGION") or None
            session = boto3.session.Session(region_name=region)
            credentials = session.get_credentials()
        except BotoCoreError as exc:  # e.g. AWS_PROFILE names no profile
            raise DeployError(f"AWS configuration: {exc}") from None
        if not session.region_name:
            raise DeployError(
                "no AWS region: set AWS_REGION (or a region in your AWS profile), or pass REGION=…"
            )
        if credentials is None:
            raise DeployError(
                "no AWS credentials: set AWS_PROFILE (see `aws configure` or `aws sso login`) "
                "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        standard = Config(retries={"max_attempts": 10, "mode": "standard"})
        # The migrate function may run for its whole timeout (300 s); never invoke it twice.
        invoke = Config(connect_timeout=10, read_timeout=360, retries={"total_max_attempts": 1})
        return cls(
            region=str(session.region_name),
            cloudformation=session.client("cloudformation", config=standard),
            s3=session.client("s3", config=standard),
            ssm=session.client("ssm", config=standard),
            lambda_=session.client("lambda", config=invoke),
            sts=session.client("sts", config=standard),
            cloudfront=session.client("cloudfront", config=standard),
        )

    def account(self) -> str:
        try:
            return str(self.sts.get_caller_identity()["Account"])
        except Exception as exc:  # any failure here means: no usable credentials
            raise DeployError(f"the AWS credentials do not work: {_error_message(exc)}") from None


# ---------------------------------------------------------------- SSM parameters


def parameter_name(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def existing_parameters(ssm: Any, path: str) -> dict[str, str]:
    """The MAOF parameters that exist under `path`: name -> type (values are not read)."""
    names = [parameter_name(path, name) for name in (*SSM_SECRETS, *SSM_MIGRATION_SECRETS)]
    found = ssm.get_parameters(Names=names, WithDecryption=False)["Parameters"]
    return {item["Name"].rsplit("/", 1)[1]: str(item["Type"]) for item in found}


def put_secret(ssm: Any, name: str, value: str, *, overwrite: bool, kms_key_id: str | None) -> None:
    kwargs: dict[str, Any] = {
        "Name": name,
        "Value": value,
        "Type": "SecureString",
        "Overwrite": overwrite,
        "Description": "MAOF: read by the Lambda functions at cold start",
    }
    if kms_key_id:
        kwargs["KeyId"] = kms_key_id
    ssm.put_parameter(**kwargs)


def ensure_secrets(
    ssm: Any,
    path: str,
    *,
    urls: Mapping[str, str | None] | None = None,
    overwrite_urls: bool = False,
    ask: Ask | None = None,
    kms_key_id: str | None = None,
) -> dict[str, str]:
    """Create the parameters missing under `path`; return name -> created|updated|exists|missing.

    jwt-secret and secret-key are generated (64 random URL-safe characters), and
    audit-signing-key (a new Ed25519 key set), and never overwritten: a new secret-key could
    no longer decrypt the agent tokens already stored (rotate-key handles that, and adds
    audit keys without dropping the old ones). database-url, migration-database-url and
    redis-url come from `urls`, else from `ask` (a prompt), else stay missing.
    """
    existing = existing_parameters(ssm, path)
    result: dict[str, str] = {}
    for name, generate in GENERATED_SECRETS.items():
        if name in existing:
            result[name] = "exists"
            continue
        generated = generate()
        put_secret(
            ssm, parameter_name(path, name), generated, overwrite=False, kms_key_id=kms_key_id
        )
        result[name] = "created"
    for name, schemes in URL_SECRETS.items():
        value = (urls or {}).get(name)
        if name in existing and not overwrite_urls:
            result[name] = "exists"
            continue
        if not value and ask is not None:
            value = ask(name).strip()
        if not value:
            result[name] = "exists" if name in existing else "missing"
            continue
        if not value.startswith(schemes):
            raise DeployError(f"{name} must start with {' or '.join(schemes)}")
        put_secret(
            ssm,
            parameter_name(path, name),
            value,
            overwrite=name in existing,
            kms_key_id=kms_key_id,
        )
        result[name] = "updated" if name in existing else "created"
    for name, kind in existing.items():
        if kind != "SecureString":
            say(f"warning: {parameter_name(path, name)} is a {kind} parameter, not a SecureString")
    return result


def require_secrets(ssm: Any, path: str, stage: str, kms_key_id: str | None = None) -> None:
    """What deploy checks first: generate the random secrets, insist on the two URLs."""
    result = ensure_secrets(ssm, path, kms_key_id=kms_key_id)
    missing = [name for name, state in result.items() if state == "missing"]
    if missing:
        raise DeployError(
            f"SSM parameter {parameter_name(path, missing[0])} is missing: run "
            f"`make secrets STAGE={stage}` first (it asks for the two database URLs and Redis's)"
        )
    say(
        f"SSM parameters under {path}: "
        + ", ".join(
            f"{name} ({state})" if state != "exists" else name for name, state in result.items()
        )
    )


def delete_secrets(ssm: Any, path: str) -> list[str]:
    names = [parameter_name(path, name) for name in (*SSM_SECRETS, *SSM_MIGRATION_SECRETS)]
    return list(ssm.delete_parameters(Names=names).get("DeletedParameters", []))


# ---------------------------------------------------------------- packaging


def package(stage: str, out_dir: Path = DEFAULT_PACKAGE_DIR) -> Path:
    """`chalice package` the stage with infra/template.json merged, into `out_dir`."""
    # Importing app.py binds the SQS trigger to MAOF_STAGE_QUEUE_NAME and the CORS preflight
    # to MAOF_CORS_ORIGIN: local settings (a .env the Makefile exports) must not leak in.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAOF_")}
    env.setdefault("AWS_DEFAULT_REGION", env.get("AWS_REGION", "us-east-1"))
    shutil.rmtree(out_dir, ignore_errors=True)
    chalice = Path(sys.executable).parent / "chalice"
    command = [
        str(chalice if chalice.exists() else "chalice"),
        "package",
        "--stage",
        stage,
        "--merge-template",
        MERGE_TEMPLATE,
        str(out_dir),
    ]
    # Chalice downloads Linux wheels from PyPI the first time: let its progress show.
    result = subprocess.run(command, cwd=PROJECT_DIR, env=env, check=False)
    if result.returncode != 0:
        raise DeployError(f"chalice package failed (exit {result.returncode}): see above")
    check_package(out_dir)
    return out_dir


def load_package(package_dir: Path) -> dict[str, Any]:
    template_path = package_dir / "sam.json"
    if not template_path.exists() or not (package_dir / "deployment.zip").exists():
        raise DeployError(f"{package_dir} holds no chalice package: run `make package`")
    template: dict[str, Any] = json.loads(template_path.read_text())
    return template


def check_package(package_dir: Path) -> dict[str, Any]:
    """Refuse a package the stack could not run: a function without its role from
    infra/template.json, or an SQS trigger bound to a queue the template does not make."""
    template = load_package(package_dir)
    resources = template["Resources"]
    for name, resource in resources.items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        role = resource["Properties"].get("Role")
        if not (isinstance(role, dict) and "Fn::GetAtt" in role):
            raise DeployError(f"function {name} has no role in {MERGE_TEMPLATE}: add {name}Role")
        queues = {
            str(r["Properties"].get("QueueName"))
            for r in resources.values()
            if r["Type"] == "AWS::SQS::Queue"
        }
        for event in resource["Properties"].get("Events", {}).values():
            if event["Type"] != "SQS":
                continue
            arn = event["Properties"]["Queue"]
            arn = arn.get("Fn::Sub", "") if isinstance(arn, dict) else str(arn)
            if arn.rsplit(":", 1)[-1] not in queues:
                raise DeployError(f"{name} is triggered by {arn}, a queue the template lacks")
    return template


def rewrite_code_uris(template: dict[str, Any], bucket: str, key: str) -> int:
    """Point every function's local CodeUri at the uploaded zip; return how many."""
    count = 0
    for resource in template["Resources"].values():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        properties = resource["Properties"]
        if isinstance(properties.get("CodeUri"), str):
            properties["CodeUri"] = {"Bucket": bucket, "Key": key}
            count += 1
    return count


# ---------------------------------------------------------------- artifacts


def artifacts_bucket_name(account: str, region: str) -> str:
    return f"maof-artifacts-{account}-{region}"


def bucket_exists(s3: Any, bucket: str) -> bool:
    try:
        s3.head_bucket(Bucket=bucket)
        return True
    except Exception as exc:  # botocore ClientError; codes checked below
        if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise DeployError(f"bucket {bucket}: {_error_code(exc) or exc}") from None


def ensure_artifacts_bucket(s3: Any, bucket: str, region: str) -> None:
    """A private bucket for the code zips and templates CloudFormation reads."""
    if bucket_exists(s3, bucket):
        return
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    s3.create_bucket(**kwargs)
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    say(f"created the artifacts bucket {bucket}")


def object_url(s3: Any, bucket: str, key: str) -> str:
    """The https URL CloudFormation reads a template from (path-style off AWS, for LocalStack)."""
    endpoint = urlparse(str(s3.meta.endpoint_url))
    host = endpoint.hostname or ""
    if host.endswith(("amazonaws.com", "amazonaws.com.cn")):
        return f"https://{bucket}.{host}/{key}"
    return f"{s3.meta.endpoint_url.rstrip('/')}/{bucket}/{key}"


def upload_template(s3: Any, bucket: str, prefix: str, template: dict[str, Any]) -> str:
    body = json.dumps(template, indent=1).encode()
    key = f"{prefix}/template-{hashlib.sha256(body).hexdigest()[:16]}.json"
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
    return object_url(s3, bucket, key)


def upload_package(s3: Any, bucket: str, stage: str, package_dir: Path) -> str:
    """Upload the zip (content-addressed) and the rewritten template; return its URL."""
    template = load_package(package_dir)
    code = (package_dir / "deployment.zip").read_bytes()
    key = f"{stage}/deployment-{hashlib.sha256(code).hexdigest()[:16]}.zip"
    s3.put_object(Bucket=bucket, Key=key, Body=code, ContentType="application/zip")
    rewrite_code_uris(template, bucket, key)
    say(f"uploaded s3://{bucket}/{key} ({len(code) / 1e6:.1f} MB)")
    return upload_template(s3, bucket, stage, template)


def delete_prefix(s3: Any, bucket: str, prefix: str) -> int:
    keys: list[dict[str, str]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [{"Key": item["Key"]} for item in page.get("Contents", [])]
    for start in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[start : start + 1000]})
    return len(keys)


def empty_bucket(s3: Any, bucket: str) -> int:
    """Delete every object (and version) so CloudFormation can delete the bucket."""
    if not bucket_exists(s3, bucket):
        return 0
    objects: list[dict[str, str]] = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
            objects.append({"Key": item["Key"], "VersionId": item["VersionId"]})
    for start in range(0, len(objects), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": objects[start : start + 1000]})
    return len(objects)


# ---------------------------------------------------------------- the stack


@dataclass
class StackParameters:
    """What the operator may set; None keeps the stack's previous value (or the default)."""

    secrets_path: str
    subnet_ids: str | None = None
    security_group_ids: str | None = None
    alarm_email: str | None = None
    cors_origin: str | None = None
    log_retention_days: str | None = None
    secrets_kms_key_arn: str | None = None
    api_rate_limit: str | None = None
    api_burst_limit: str | None = None
    run_stage_max_concurrency: str | None = None
    api_reserved_concurrency: str | None = None

    def given(self) -> dict[str, str]:
        if (self.subnet_ids is None) != (self.security_group_ids is None):
            raise DeployError("give SUBNET_IDS and SECURITY_GROUP_IDS together (or neither)")
        values = {
            "SecretsParameterPath": self.secrets_path,
            "SubnetIds": self.subnet_ids,
            "SecurityGroupIds": self.security_group_ids,
            "AlarmEmail": self.alarm_email,
            "CorsOrigin": self.cors_origin,
            "LogRetentionDays": self.log_retention_days,
            "SecretsKmsKeyArn": self.secrets_kms_key_arn,
            "ApiThrottlingRateLimit": self.api_rate_limit,
            "ApiThrottlingBurstLimit": self.api_burst_limit,
            "RunStageMaxConcurrency": self.run_stage_max_concurrency,
            "ApiReservedConcurrency": self.api_reserved_concurrency,
        }
        return {key: value for key, value in values.items() if value is not None}


def stack_parameters(
    given: Mapping[str, str], template_keys: Iterable[str], previous_keys: Iterable[str]
) -> list[dict[str, Any]]:
    """Given values; for the rest the stack's previous value, else the template default."""
    previous = set(previous_keys)
    parameters: list[dict[str, Any]] = []
    for key in template_keys:
        if key in given:
            parameters.append({"ParameterKey": key, "ParameterValue": given[key]})
        elif key in previous:
            parameters.append({"ParameterKey": key, "UsePreviousValue": True})
    return parameters


def describe_stack(cfn: Any, name: str) -> dict[str, Any] | None:
    try:
        stacks = cfn.describe_stacks(StackName=name)["Stacks"]
    except Exception as exc:  # botocore ClientError "does not exist"
        if "does not exist" in _error_message(exc):
            return None
        raise
    return dict(stacks[0]) if stacks else None


def physical_id(cfn: Any, name: str, logical_id: str) -> str | None:
    """A resource's physical id, when the stack has it (a stack without outputs: a failed
    update, a failed delete)."""
    try:
        found = cfn.describe_stack_resource(StackName=name, LogicalResourceId=logical_id)
    except Exception:  # not in the stack (any more)
        return None
    return str(found["StackResourceDetail"].get("PhysicalResourceId") or "") or None


def stack_outputs(stack: Mapping[str, Any] | None) -> dict[str, str]:
    return {item["OutputKey"]: item["OutputValue"] for item in (stack or {}).get("Outputs", [])}


class _Events:
    """Prints a stack's new events as they happen; remembers its failures."""

    def __init__(self, cfn: Any, name: str, out: Say) -> None:
        self.cfn, self.name, self.out = cfn, name, out
        self.seen: set[str] = set()
        self.failures: list[str] = []
        self.poll(quiet=True)

    def poll(self, quiet: bool = False) -> None:
        try:
            events = self.cfn.describe_stack_events(StackName=self.name)["StackEvents"]
        except Exception:  # a stack being created or just deleted
            return
        for event in reversed(events):
            if event["EventId"] in self.seen:
                continue
            self.seen.add(event["EventId"])
            if quiet:
                continue
            reason = " ".join(str(event.get("ResourceStatusReason", "")).split())
            line = f"  {event['LogicalResourceId']:<30} {event['ResourceStatus']}"
            self.out(f"{line} {reason}".rstrip())
            if event["ResourceStatus"].endswith("FAILED") and reason:
                self.failures.append(f"{event['LogicalResourceId']}: {reason}")


def wait_for_stack(
    cfn: Any,
    name: str,
    success: set[str],
    *,
    events: _Events | None = None,
    timeout: float = STACK_TIMEOUT_SECONDS,
    poll: float = 5.0,
) -> dict[str, Any]:
    """Poll until the stack reaches one of `success` (DELETE_COMPLETE: until it is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        if events:
            events.poll()
        stack = describe_stack(cfn, name)
        if stack is None or stack["StackStatus"] == "DELETE_COMPLETE":
            if "DELETE_COMPLETE" in success:
                return {}
            raise DeployError(f"stack {name} disappeared")
        status = str(stack["StackStatus"])
        if status in success:
            return stack
        if not status.endswith("_IN_PROGRESS"):
            causes = "; ".join(events.failures if events else []) or stack.get(
                "StackStatusReason", ""
            )
            raise DeployError(f"stack {name} ended {status}: {causes or 'see its events'}")
        if time.monotonic() > deadline:
            raise DeployError(
                f"stack {name} is still {status} after {timeout:.0f}s; "
                "watch it in the CloudFormation console, then run the command again"
            )
        time.sleep(poll)


def delete_stack(
    cfn: Any, name: str, *, timeout: float = STACK_TIMEOUT_SECONDS, poll: float = 5.0
) -> None:
    events = _Events(cfn, name, say)
    cfn.delete_stack(StackName=name)
    wait_for_stack(cfn, name, {"DELETE_COMPLETE"}, events=events, timeout=timeout, poll=poll)


def deploy_stack(
    cfn: Any,
    name: str,
    template_url: str,
    template: Mapping[str, Any],
    given: Mapping[str, str],
    *,
    timeout: float = STACK_TIMEOUT_SECONDS,
    poll: float = 5.0,
) -> dict[str, str]:
    """Create or update the stack through a change set; return its outputs."""
    stack = describe_stack(cfn, name)
    status = stack["StackStatus"] if stack else None
    if status == "ROLLBACK_COMPLETE":
        say(f"stack {name} is ROLLBACK_COMPLETE (its first create failed): deleting it first")
        delete_stack(cfn, name, timeout=timeout, poll=poll)
        stack, status = None, None
    if status and status.endswith("_IN_PROGRESS") and status != "REVIEW_IN_PROGRESS":
        raise DeployError(f"stack {name} is {status}: wait until it finishes, then deploy again")
    if status in ("UPDATE_ROLLBACK_FAILED", "DELETE_FAILED"):
        raise DeployError(
            f"stack {name} is {status}: fix it in the CloudFormation console "
            "(continue the rollback, or `make destroy`), then deploy again"
        )
    change_type = "CREATE" if status in (None, "REVIEW_IN_PROGRESS") else "UPDATE"
    previous = [p["ParameterKey"] for p in (stack or {}).get("Parameters", [])]
    parameters = stack_parameters(
        given, template.get("Parameters", {}), previous if change_type == "UPDATE" else []
    )
    # Unique even for two deploys within a second (a name in use would be the old change set).
    change_set = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{random.token_hex(3)}"
    cfn.create_change_set(
        StackName=name,
        ChangeSetName=change_set,
        ChangeSetType=change_type,
        TemplateURL=template_url,
        Parameters=parameters,
        Capabilities=CAPABILITIES,
        Description="make deploy",
    )
    deadline = time.monotonic() + CHANGE_SET_TIMEOUT_SECONDS
    while True:
        described = cfn.describe_change_set(ChangeSetName=change_set, StackName=name)
        if described["Status"] in ("CREATE_COMPLETE", "FAILED", "DELETE_COMPLETE"):
            break
        if time.monotonic() > deadline:
            raise DeployError(f"change set {change_set} is still {described['Status']}")
        time.sleep(min(poll, 2.0))
    if described["Status"] != "CREATE_COMPLETE":
        reason = " ".join(str(described.get("StatusReason", "")).split())
        if "didn't contain changes" in reason or "No updates are to be performed" in reason:
            cfn.delete_change_set(ChangeSetName=change_set, StackName=name)
            say(f"stack {name}: no changes")
            return stack_outputs(describe_stack(cfn, name))
        raise DeployError(f"change set {change_set} failed: {reason}")
    if described.get("ExecutionStatus", "AVAILABLE") != "AVAILABLE":
        raise DeployError(f"change set {change_set} is {described['ExecutionStatus']}")
    say(f"{'creating' if change_type == 'CREATE' else 'updating'} stack {name} ({change_set})")
    events = _Events(cfn, name, say)
    started = time.monotonic()
    cfn.execute_change_set(ChangeSetName=change_set, StackName=name)
    final = wait_for_stack(
        cfn,
        name,
        {"CREATE_COMPLETE", "UPDATE_COMPLETE"},
        events=events,
        timeout=timeout,
        poll=poll,
    )
    say(f"stack {name} {final['StackStatus']} in {time.monotonic() - started:.0f}s")
    return stack_outputs(final)


# ---------------------------------------------------------------- after the stack


def wait_function_ready(
    lambda_: Any, function: str, timeout: float = FUNCTION_READY_TIMEOUT_SECONDS
) -> None:
    """Wait until the function is Active and not mid-update (VPC functions take a while)."""
    deadline = time.monotonic() + timeout
    while True:
        config = lambda_.get_function_configuration(FunctionName=function)
        state, update = config.get("State", "Active"), config.get("LastUpdateStatus", "Successful")
        if state == "Failed" or update == "Failed":
            reason = config.get("StateReason") or config.get("LastUpdateStatusReason")
            raise DeployError(f"function {function} failed to start: {reason}")
        if state == "Active" and update in ("Successful", None):
            return
        if time.monotonic() > deadline:
            raise DeployError(f"function {function} is still {state}/{update}")
        time.sleep(3)


def invoke_migrate(
    lambda_: Any,
    function: str,
    log_group: str = "its log group",
    event: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the migrations in the account (or another maintenance `event`, see
    chalicelib/db/migrate.py): invoke the `migrate` function and wait for it."""
    wait_function_ready(lambda_, function)
    response = lambda_.invoke(
        FunctionName=function,
        InvocationType="RequestResponse",
        Payload=json.dumps(dict(event or {})).encode(),
    )
    raw = response["Payload"].read()
    payload = json.loads(raw) if raw else None
    if response.get("FunctionError"):
        detail = payload if not isinstance(payload, dict) else payload.get("errorMessage", payload)
        kind = payload.get("errorType", "error") if isinstance(payload, dict) else "error"
        raise DeployError(
            f"the migrate function failed ({kind}): {' '.join(str(detail).split())} "
            f"(more in {log_group})"
        )
    if not isinstance(payload, dict):
        raise DeployError(f"the migrate function answered {payload!r}")
    return payload


def publish_dashboard(s3: Any, bucket: str, api_url: str, source: Path = SITE_DIR) -> list[str]:
    """Upload dashboard/ with its Content-Types and a config.json naming `api_url`, as
    `make dev` does locally; objects no longer in the site are removed."""
    from devstack.dashboard import upload_site

    try:
        return upload_site(api_url, bucket, source, s3=s3)
    except FileNotFoundError as exc:
        raise DeployError(str(exc)) from None


def invalidate_dashboard(cloudfront: Any, distribution_id: str) -> str:
    """Have CloudFront drop its copies of the site, so a deploy shows at once; returns the
    invalidation's id. One path, `/*`: the modules change with index.html, and CloudFront
    bills an invalidation by path (the first 1,000 paths a month are free). Not waited
    for: it completes within a minute or two."""
    answer = cloudfront.create_invalidation(
        DistributionId=distribution_id,
        InvalidationBatch={
            "Paths": {"Quantity": 1, "Items": ["/*"]},
            "CallerReference": f"make-deploy-{time.time_ns()}",
        },
    )
    return str(answer["Invalidation"]["Id"])


def check_health(api_url: str, timeout: float = 30.0) -> str:
    """GET /health once (a cold start in a VPC reads SSM first: allow it time)."""
    url = f"{api_url}/health"
    if not url.startswith(("https://", "http://")):
        return f"not an http(s) URL: {api_url}"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (https API)
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            body = json.load(exc)
        except ValueError:
            return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"no answer ({' '.join(str(exc).split())})"
    data = body.get("data") or {}
    services = ", ".join(f"{name} {state}" for name, state in data.get("services", {}).items())
    if not data:
        error = body.get("error") or {}
        return f"{error.get('code', 'unexpected answer')}: {error.get('message', '')}".strip()
    return f"{data.get('status')} ({services})"


# ---------------------------------------------------------------- commands


@dataclass
class Deployed:
    api_url: str
    dashboard_url: str
    outputs: dict[str, str]
    migration: dict[str, Any]
    health: str


def deploy(
    aws: Aws,
    stage: str,
    parameters: StackParameters,
    *,
    package_dir: Path | None = None,
    timeout: float = STACK_TIMEOUT_SECONDS,
    poll: float = 5.0,
    site_dir: Path = SITE_DIR,
    artifacts_bucket: str | None = None,
) -> Deployed:
    """Everything `make deploy` does, in order; see the module docstring."""
    account = aws.account()
    name = stack_name(stage)
    say(f"account {account}, region {aws.region}, stack {name}")
    require_secrets(aws.ssm, parameters.secrets_path, stage, parameters.secrets_kms_key_arn)
    given = parameters.given()
    if package_dir is None:
        say(f"chalice package --stage {stage} --merge-template {MERGE_TEMPLATE} build/package")
        package_dir = package(stage)
    template = check_package(package_dir)
    bucket = artifacts_bucket or artifacts_bucket_name(account, aws.region)
    ensure_artifacts_bucket(aws.s3, bucket, aws.region)
    template_url = upload_package(aws.s3, bucket, stage, package_dir)
    outputs = deploy_stack(
        aws.cloudformation, name, template_url, template, given, timeout=timeout, poll=poll
    )
    missing = {"EndpointURL", "MigrateFunctionName", "DashboardBucketName"} - set(outputs)
    if missing:
        raise DeployError(f"stack {name} lacks the outputs {sorted(missing)}")
    api_url = outputs["EndpointURL"].rstrip("/")
    migration = invoke_migrate(
        aws.lambda_, outputs["MigrateFunctionName"], f"/aws/lambda/{name}-migrate"
    )
    say(
        f"migrate: database at {migration.get('toRevision')}"
        f" (was {migration.get('fromRevision') or 'empty'})"
    )
    written = publish_dashboard(aws.s3, outputs["DashboardBucketName"], api_url, site_dir)
    say(f"dashboard: {len(written)} files in s3://{outputs['DashboardBucketName']}")
    distribution = outputs.get("DashboardDistributionId")
    if distribution and aws.cloudfront is not None:
        invalidation = invalidate_dashboard(aws.cloudfront, distribution)
        say(f"dashboard: CloudFront invalidation {invalidation} of /* in {distribution}")
    health = check_health(api_url)
    say(f"GET /health: {health}")
    return Deployed(api_url, outputs.get("DashboardURL", ""), outputs, migration, health)


def destroy(
    aws: Aws,
    stage: str,
    *,
    secrets_path: str,
    confirm: Ask | None,
    remove_secrets: bool = False,
    timeout: float = STACK_TIMEOUT_SECONDS,
    poll: float = 5.0,
    artifacts_bucket: str | None = None,
) -> None:
    """Delete the stack and this stage's artifacts; `confirm` None means already confirmed."""
    account = aws.account()
    name = stack_name(stage)
    stack = describe_stack(aws.cloudformation, name)
    if stack is None:
        say(f"stack {name} does not exist in account {account}, region {aws.region}")
    else:
        if confirm is not None:
            answer = confirm(
                f"Delete stack {name} in account {account}, region {aws.region} (API, functions, "
                f"queues and their messages, dashboard bucket, logs)? Type {name} to confirm: "
            )
            if answer.strip() != name:
                raise DeployError("not confirmed; nothing was deleted")
        bucket = stack_outputs(stack).get("DashboardBucketName") or physical_id(
            aws.cloudformation, name, "DashboardBucket"
        )
        if bucket:
            say(f"emptied the dashboard bucket {bucket} ({empty_bucket(aws.s3, bucket)} objects)")
        say(f"deleting stack {name}")
        delete_stack(aws.cloudformation, name, timeout=timeout, poll=poll)
        say(f"stack {name} deleted")
    artifacts = artifacts_bucket or artifacts_bucket_name(account, aws.region)
    if bucket_exists(aws.s3, artifacts):
        removed = delete_prefix(aws.s3, artifacts, f"{stage}/")
        left = aws.s3.list_objects_v2(Bucket=artifacts, MaxKeys=1).get("KeyCount", 0)
        if not left:
            aws.s3.delete_bucket(Bucket=artifacts)
            say(f"deleted the artifacts bucket {artifacts} ({removed} objects)")
        else:
            say(f"deleted {removed} artifacts of {stage} from {artifacts} (other stages remain)")
    if remove_secrets:
        deleted = delete_secrets(aws.ssm, secrets_path)
        say(f"deleted the SSM parameters {', '.join(deleted) or '(none existed)'}")
    else:
        say(
            f"kept the SSM parameters under {secrets_path} (secret-key decrypts the agent tokens "
            f"in your database); `make destroy STAGE={stage} DELETE_SECRETS=1` deletes them"
        )
    say("your Postgres and Redis were not touched")


def _prompt_secret(name: str) -> str:
    hint = {
        "database-url": "the application's role, INSERT/SELECT only on the audit trail: "
        "postgresql://maof_app:PASSWORD@HOST:5432/DBNAME?sslmode=require",
        "migration-database-url": "the schema owner's, for migrations only: "
        "postgresql://OWNER:PASSWORD@HOST:5432/DBNAME?sslmode=require",
        "redis-url": "rediss://:AUTH_TOKEN@HOST:6379/0 (or redis://HOST:6379/0)",
    }[name]
    return getpass.getpass(f"{name} ({hint}), not echoed: ")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infra.deploy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("package", "secrets", "deploy", "destroy", "info"):
        sub = commands.add_parser(command)
        sub.add_argument("--stage", default="prod")
        if command == "package":
            sub.add_argument("--out", type=Path, default=DEFAULT_PACKAGE_DIR)
            continue
        sub.add_argument("--region", default=None)
        sub.add_argument("--secrets-path", default=None, help="default /maof/<stage>")
        if command == "secrets":
            sub.add_argument("--overwrite", action="store_true", help="replace the two URLs")
            sub.add_argument("--kms-key-id", default=None)
        if command == "deploy":
            sub.add_argument("--package-dir", type=Path, default=None, help="skip packaging")
            sub.add_argument("--subnet-ids", default=None)
            sub.add_argument("--security-group-ids", default=None)
            sub.add_argument("--alarm-email", default=None)
            sub.add_argument("--cors-origin", default=None)
            sub.add_argument("--log-retention-days", default=None)
            sub.add_argument("--secrets-kms-key-arn", default=None)
            sub.add_argument("--api-rate-limit", default=None, help="requests/s for the API")
            sub.add_argument("--api-burst-limit", default=None)
            sub.add_argument("--run-stage-max-concurrency", default=None)
            sub.add_argument("--api-reserved-concurrency", default=None)
        if command == "destroy":
            sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
            sub.add_argument("--delete-secrets", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "package":
            out = package(args.stage, args.out)
            print(f"package: {out / 'sam.json'} and {out / 'deployment.zip'}")
            return 0
        aws = Aws.connect(args.region)
        path = args.secrets_path or default_secrets_path(args.stage)
        if args.command == "secrets":
            urls = {
                "database-url": os.environ.get("MAOF_DEPLOY_DATABASE_URL"),
                "migration-database-url": os.environ.get("MAOF_DEPLOY_MIGRATION_DATABASE_URL"),
                "redis-url": os.environ.get("MAOF_DEPLOY_REDIS_URL"),
            }
            result = ensure_secrets(
                aws.ssm,
                path,
                urls=urls,
                overwrite_urls=args.overwrite,
                ask=_prompt_secret if sys.stdin.isatty() else None,
                kms_key_id=args.kms_key_id,
            )
            for name, state in result.items():
                print(f"secrets: {parameter_name(path, name)}: {state}")
            if "missing" in result.values():
                print(
                    "secrets: set MAOF_DEPLOY_DATABASE_URL and MAOF_DEPLOY_REDIS_URL, "
                    "or run this in a terminal to be asked",
                    file=sys.stderr,
                )
                return 1
            return 0
        if args.command == "info":
            outputs = stack_outputs(describe_stack(aws.cloudformation, stack_name(args.stage)))
            if not outputs:
                print(f"stack {stack_name(args.stage)} does not exist in {aws.region}")
                return 1
            for key, value in sorted(outputs.items()):
                print(f"{key}: {value}")
            return 0
        if args.command == "destroy":
            if not args.yes and not sys.stdin.isatty():
                raise DeployError(
                    "destroy asks for confirmation: run it in a terminal or add YES=1"
                )
            destroy(
                aws,
                args.stage,
                secrets_path=path,
                confirm=None if args.yes else input,
                remove_secrets=args.delete_secrets,
            )
            return 0
        parameters = StackParameters(
            secrets_path=path,
            subnet_ids=args.subnet_ids,
            security_group_ids=args.security_group_ids,
            alarm_email=args.alarm_email,
            cors_origin=args.cors_origin,
            log_retention_days=args.log_retention_days,
            secrets_kms_key_arn=args.secrets_kms_key_arn,
            api_rate_limit=args.api_rate_limit,
            api_burst_limit=args.api_burst_limit,
            run_stage_max_concurrency=args.run_stage_max_concurrency,
            api_reserved_concurrency=args.api_reserved_concurrency,
        )
        done = deploy(aws, args.stage, parameters, package_dir=args.package_dir)
    except DeployError as exc:
        print(f"deploy: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deploy: interrupted", file=sys.stderr)
        return 130
    print()
    print(f"API:       {done.api_url}")
    print(f"Dashboard: {done.dashboard_url or '(the stack has no DashboardURL output)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
