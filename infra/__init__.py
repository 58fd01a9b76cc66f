"""Deploying MAOF to AWS (docs/deploy.md): `python -m infra COMMAND`, as make runs it."""


class DeployError(Exception):
    """A deploy step cannot go on; the message (one line) says why and what to do."""


def say(message: str) -> None:
    print(f"deploy: {message}", flush=True)
