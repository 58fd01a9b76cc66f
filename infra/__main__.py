"""`python -m infra COMMAND`: what the Makefile's AWS targets run (docs/deploy.md)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from infra import DeployError, deploy, secrets

HINTS = {
    "database-url": "the application's role, INSERT/SELECT only on the audit trail: "
    "postgresql://maof_app:PASSWORD@HOST:5432/DBNAME?sslmode=require",
    "migration-database-url": "the schema owner's, for migrations only: "
    "postgresql://OWNER:PASSWORD@HOST:5432/DBNAME?sslmode=require",
    "redis-url": "rediss://:AUTH_TOKEN@HOST:6379/0 (or redis://HOST:6379/0)",
}


def ask(name: str) -> str:
    return getpass.getpass(f"{name} ({HINTS[name]}), not echoed: ")


def run(args: argparse.Namespace) -> None:
    session = boto3.session.Session(region_name=args.region or os.environ.get("AWS_REGION"))
    path = args.secrets_path or f"/maof/{args.stage}"
    stage = deploy.Stage(session, args.stage, path, args.kms_key_id)
    if args.command == "secrets":
        env = {
            name: os.environ.get(f"MAOF_DEPLOY_{name.replace('-', '_').upper()}") for name in HINTS
        }
        result = secrets.ensure_secrets(
            session.client("ssm"),
            path,
            urls=env,
            overwrite_urls=args.overwrite,
            ask=ask if sys.stdin.isatty() else None,
            kms_key_id=args.kms_key_id,
        )
        print("\n".join(f"secrets: {path}/{name}: {state}" for name, state in result.items()))
        if "missing" in result.values():
            raise DeployError(
                "give MAOF_DEPLOY_DATABASE_URL, MAOF_DEPLOY_MIGRATION_DATABASE_URL "
                "and MAOF_DEPLOY_REDIS_URL, or run this in a terminal to be asked"
            )
    elif args.command == "deploy":
        health = deploy.deploy(stage, args.parameters)
        outputs = stage.outputs()
        print(f"\nAPI:       {outputs['EndpointURL']}\nDashboard: {outputs.get('DashboardURL')}")
        if not health.startswith("ok "):  # deployed all the same: a pipeline must notice
            raise DeployError(f"deployed, but GET /health says {health}: see docs/deploy.md")
    elif args.command == "destroy":
        if not args.yes and not sys.stdin.isatty():
            raise DeployError("destroy asks for confirmation: run it in a terminal or add YES=1")
        deploy.destroy(stage, None if args.yes else input, args.delete_secrets)
    else:
        deploy.rotate(stage, args.command, args.key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description=__doc__)
    parser.add_argument(
        "command", choices=["secrets", "deploy", "destroy", "rotate-key", "retire-keys"]
    )
    parser.add_argument("parameters", nargs="*", help="deploy: stack parameters as KEY=VALUE")
    parser.add_argument("--stage", default="prod")
    parser.add_argument("--region")
    parser.add_argument("--secrets-path", help="default /maof/STAGE")
    parser.add_argument("--kms-key-id", help="the KMS key of the SSM parameters")
    parser.add_argument("--overwrite", action="store_true", help="secrets: replace the URLs")
    parser.add_argument("--yes", action="store_true", help="destroy: do not ask first")
    parser.add_argument("--delete-secrets", action="store_true", help="destroy: SSM's too")
    parser.add_argument("--key", choices=secrets.ROTATABLE, help="rotate-key, retire-keys")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (DeployError, BotoCoreError, ClientError) as exc:
        print(f"{args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
