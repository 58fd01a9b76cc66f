"""Test only: botocore waiters poll every MAOF_TEST_WAITER_DELAY seconds.

On PYTHONPATH of the AWS CLI that tests/integration/test_infra_localstack.py deploys with:
`aws cloudformation deploy` polls the stack every 30 s (awscli's Deployer.wait_for_execute),
and LocalStack finishes in a second or two, so each deploy of the tests slept 30 s. How
often a waiter looks changes nothing of what it waits for (it still waits, up to its
attempts, for the state it expects)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def quick(wait: Callable[..., None], delay: float) -> Callable[..., None]:
    """`wait` (botocore's Waiter.wait) polling every `delay` seconds."""

    def quick_wait(self: Any, **kwargs: Any) -> None:
        config = {**(kwargs.pop("WaiterConfig", None) or {}), "Delay": delay}
        wait(self, WaiterConfig=config, **kwargs)

    return quick_wait


if os.environ.get("MAOF_TEST_WAITER_DELAY"):
    from botocore import waiter

    waiter.Waiter.wait = quick(  # type: ignore[method-assign]
        waiter.Waiter.wait, float(os.environ["MAOF_TEST_WAITER_DELAY"])
    )
