"""Deploying MAOF to AWS (docs/deploy.md): `python -m infra COMMAND`, as make runs it."""

from __future__ import annotations

import os
import subprocess
import sys


class DeployError(Exception):
    """A deploy step cannot go on; the message (one line) says why and what to do."""


def say(message: str) -> None:
    print(f"deploy: {message}", flush=True)


def aws(
    *args: str,
    region: str,
    endpoint: str | None = None,
    stdin: bytes | None = None,
    quiet: bool = True,
) -> None:
    """The AWS CLI as pinned in requirements-dev.txt (`quiet`: its errors only); `endpoint`:
    LocalStack's, which is sent dummy credentials, never the ones this shell may hold."""
    where = ["--region", region, *(["--endpoint-url", endpoint] if endpoint else [])]
    env = dict(os.environ)
    if endpoint:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.pop(name, None)
        env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")  # noqa: S106 (dummy)
    done = subprocess.run(
        [sys.executable, "-m", "awscli", *where, *args],
        input=stdin,
        stdout=subprocess.DEVNULL if quiet else None,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise DeployError(f"aws {' '.join(args[:2])} failed: see above")
