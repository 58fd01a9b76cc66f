"""AWS clients (SQS, S3), created lazily once per process; LocalStack when configured."""

from __future__ import annotations

import functools
import threading
from typing import Any

from chalicelib.config import get_settings

_creating = threading.Lock()


def aws_client(service: str, fast_fail: bool = False, *, in_request: bool = False) -> Any:
    """A boto3 client; `fast_fail` ones give up quickly (health checks); `in_request` ones
    within seconds (two tries of a 5 s read: ~11 s for a service that never answers), for
    reads an API request waits on, which must answer within API Gateway's 29 s.

    One per process and kind: the threads of a batch (or of the local poller) that ask at
    once wait for the first one built, instead of each building its own (~50 ms of CPU
    each, most of it parsing botocore's endpoint files)."""
    with _creating:
        return _shared_client(service, fast_fail, in_request)


@functools.lru_cache(maxsize=8)
def _shared_client(service: str, fast_fail: bool, in_request: bool) -> Any:
    return new_client(service, fast_fail, in_request=in_request)


def new_client(service: str, fast_fail: bool = False, *, in_request: bool = False) -> Any:
    """A client of its own (aws_client's are shared). boto3 is imported here, not at
    module level: ~50 ms of every cold start that routes without AWS calls (reads, auth)
    need not pay."""
    import boto3
    from botocore.config import Config

    settings = get_settings()
    if fast_fail:
        config = Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1})
    elif in_request:
        # Two tries in all (botocore's `max_attempts` counts the retries alone): S3's
        # occasional 500 or SlowDown is retried, a silent S3 given up in ~11 s.
        config = Config(
            connect_timeout=2,
            read_timeout=5,
            retries={"total_max_attempts": 2, "mode": "standard"},
        )
    else:
        config = Config(
            connect_timeout=3,
            read_timeout=25,
            retries={"max_attempts": 3, "mode": "standard"},
            # One client serves every thread of the process (a batch's records run at
            # once; the local poller's workers long-poll on it): room for all of them, so
            # none opens and drops a connection per call.
            max_pool_connections=64,
        )
    kwargs: dict[str, Any] = {"region_name": settings.aws_region, "config": config}
    if settings.aws_endpoint_url:
        kwargs["endpoint_url"] = settings.aws_endpoint_url
        # LocalStack accepts any credentials; don't require real ones locally.
        kwargs.setdefault("aws_access_key_id", "test")
        kwargs.setdefault("aws_secret_access_key", "test")
    return boto3.session.Session().client(service, **kwargs)


@functools.lru_cache(maxsize=4)
def queue_url(queue_name: str) -> str:
    """The URL of a queue, from settings when given, else looked up once by name."""
    settings = get_settings()
    if settings.stage_queue_url and queue_name == settings.stage_queue_name:
        return settings.stage_queue_url
    # A quick answer or none: an API request must not hang on an absent queue service.
    return str(aws_client("sqs", fast_fail=True).get_queue_url(QueueName=queue_name)["QueueUrl"])


def stage_queue_url() -> str:
    return queue_url(get_settings().stage_queue_name)


def reset() -> None:
    _shared_client.cache_clear()
    queue_url.cache_clear()
