"""`make rotate-key` and `make retire-keys`: rotate the JWT secret or the agent-token key of a
deployed stage without signing anyone out or losing an agent.

rotate-key KEY  1. for audit-signing-key: adds a new current Ed25519 key to the key set; the
                   old key keeps its public half (GET /audit/keys), so everything it
                   signed keeps verifying, and loses its private half. Otherwise:
                   moves the current value of KEY (jwt-secret or secret-key) to the front
                   of its "previous" parameter (jwt-previous-secrets, previous-secret-keys;
                   at most KEEP_PREVIOUS kept) and stores a new random value as KEY;
                2. gives every function of the stack new execution environments (a
                   configuration update), so no warm container keeps signing with, or
                   lacking, a key: all of them now sign with the new key and accept both;
                3. for secret-key, invokes the migrate function to re-encrypt every stored
                   agent token with the new key.
retire-keys KEY (not for audit-signing-key: a public key is needed as long as what it
                signed) deletes the "previous" parameter (once tokens signed with the old secret
                have expired: MAOF_REFRESH_TOKEN_TTL_SECONDS, 7 days by default; for
                secret-key at once after rotate-key) and recycles the functions again.
"""

from __future__ import annotations

import argparse
import json
import secrets as random
import sys
import time
from typing import Any

from chalicelib.audit.keys import rotated
from chalicelib.maintenance import REENCRYPT
from infra.deploy import (
    Aws,
    DeployError,
    default_secrets_path,
    describe_stack,
    invoke_migrate,
    parameter_name,
    put_secret,
    say,
    stack_name,
    stack_outputs,
    wait_function_ready,
)

PREVIOUS = {"jwt-secret": "jwt-previous-secrets", "secret-key": "previous-secret-keys"}
AUDIT_KEY = "audit-signing-key"  # one parameter holds the whole key set
ROTATABLE = (*PREVIOUS, AUDIT_KEY)
KEEP_PREVIOUS = 2
RECYCLE_VARIABLE = "MAOF_KEYS_ROTATED_AT"


def _value(ssm: Any, name: str) -> str | None:
    found = ssm.get_parameters(Names=[name], WithDecryption=True)["Parameters"]
    return str(found[0]["Value"]) if found else None


def rotate_key(ssm: Any, path: str, key: str, kms_key_id: str | None = None) -> list[str]:
    """Store a new value for `key`, keeping the current one (and at most one older) as
    previous; returns the previous values, newest first. For audit-signing-key: add a new
    current key to the key set, the old ones keeping only their public halves; returns
    the kids of the old keys."""
    if key not in ROTATABLE:
        raise DeployError(f"KEY must be one of {', '.join(ROTATABLE)}, got {key!r}")
    current = _value(ssm, parameter_name(path, key))
    if current is None:
        raise DeployError(f"{parameter_name(path, key)} does not exist: run `make secrets` first")
    if key == AUDIT_KEY:
        new_set = rotated(current)
        put_secret(ssm, parameter_name(path, key), new_set, overwrite=True, kms_key_id=kms_key_id)
        return [str(k["kid"]) for k in json.loads(new_set)["keys"][:-1]]
    older = [v for v in (_value(ssm, parameter_name(path, PREVIOUS[key])) or "").split(",") if v]
    previous = [current, *[v for v in older if v != current]][:KEEP_PREVIOUS]
    put_secret(
        ssm,
        parameter_name(path, PREVIOUS[key]),
        ",".join(previous),
        overwrite=True,
        kms_key_id=kms_key_id,
    )
    put_secret(
        ssm,
        parameter_name(path, key),
        random.token_urlsafe(48),
        overwrite=True,
        kms_key_id=kms_key_id,
    )
    return previous


def retire_previous(ssm: Any, path: str, key: str) -> bool:
    """Delete `key`'s previous values; True if there were any."""
    if key == AUDIT_KEY:
        raise DeployError(
            "audit signing keys are never retired: entries and checkpoints they signed verify "
            "with them (rotate-key already removed the old private key)"
        )
    if key not in PREVIOUS:
        raise DeployError(f"KEY must be one of {', '.join(PREVIOUS)}, got {key!r}")
    name = parameter_name(path, PREVIOUS[key])
    deleted = ssm.delete_parameters(Names=[name]).get("DeletedParameters", [])
    return name in deleted


def stack_functions(cloudformation: Any, stack: str) -> list[str]:
    """The physical names of the stack's Lambda functions."""
    names: list[str] = []
    for page in cloudformation.get_paginator("list_stack_resources").paginate(StackName=stack):
        for resource in page["StackResourceSummaries"]:
            if resource["ResourceType"] == "AWS::Lambda::Function":
                names.append(str(resource["PhysicalResourceId"]))
    return sorted(names)


def recycle_functions(lambda_: Any, functions: list[str], stamp: str) -> None:
    """New execution environments for each function: a configuration change (one variable
    set to `stamp`) makes Lambda start fresh containers, which read SSM again."""
    for function in functions:
        wait_function_ready(lambda_, function)
        config = lambda_.get_function_configuration(FunctionName=function)
        variables = dict((config.get("Environment") or {}).get("Variables") or {})
        variables[RECYCLE_VARIABLE] = stamp
        lambda_.update_function_configuration(
            FunctionName=function, Environment={"Variables": variables}
        )
        wait_function_ready(lambda_, function)


def run(aws: Aws, stage: str, path: str, command: str, key: str, kms_key_id: str | None) -> None:
    stack = stack_name(stage)
    outputs = stack_outputs(describe_stack(aws.cloudformation, stack))
    if not outputs:
        raise DeployError(f"stack {stack} does not exist in {aws.region}: deploy it first")
    functions = stack_functions(aws.cloudformation, stack)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if command == "rotate-key":
        kept = rotate_key(aws.ssm, path, key, kms_key_id)
        say(f"{parameter_name(path, key)}: new value; {len(kept)} previous kept")
    elif key == AUDIT_KEY:
        retire_previous(aws.ssm, path, key)  # refuses, with the reason
    elif retire_previous(aws.ssm, path, key):
        say(f"{parameter_name(path, PREVIOUS[key])}: deleted")
    else:
        say(f"{parameter_name(path, PREVIOUS[key])}: nothing to retire")
    recycle_functions(aws.lambda_, functions, stamp)
    say(f"functions recycled: {', '.join(functions) or 'none'}")
    if command == "rotate-key" and key == "secret-key":
        result = invoke_migrate(
            aws.lambda_,
            outputs["MigrateFunctionName"],
            f"/aws/lambda/{stack}-migrate",
            {"action": REENCRYPT},
        )
        say(f"agent tokens re-encrypted with the new key: {result.get('reencrypted')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.rotate", description=__doc__)
    parser.add_argument("command", choices=["rotate-key", "retire-keys"])
    parser.add_argument("--key", required=True, choices=sorted(ROTATABLE))
    parser.add_argument("--stage", default="prod")
    parser.add_argument("--region", default=None)
    parser.add_argument("--secrets-path", default=None)
    parser.add_argument("--kms-key-id", default=None)
    args = parser.parse_args(argv)
    try:
        aws = Aws.connect(args.region)
        path = args.secrets_path or default_secrets_path(args.stage)
        run(aws, args.stage, path, args.command, args.key, args.kms_key_id)
    except DeployError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
