"""The ten-line verifier docs/api.md gives receivers of completion callbacks works on what
MAOF signs (chalicelib/engine/callbacks.py), and refuses what it must."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from chalicelib.core.encoding import dumps
from chalicelib.engine.callbacks import payload, signature

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
SECRET = "a-callback-secret-0123456789"


def documented_verify() -> Any:
    text = API_DOC.read_text()
    block = re.search(r"To verify a delivery:\n\n```python\n(.*?)```", text, re.S)
    assert block, "docs/api.md shows a verifier"
    namespace: dict[str, Any] = {}
    exec(block.group(1), namespace)  # noqa: S102 (our own docs, under test)
    return namespace["verify"]


RUN = SimpleNamespace(
    id=uuid.UUID("0b6f6a52-7d4e-4c1a-9a57-0c9d4c1f2e3a"),
    status="completed",
    workflow_name="wf",
    completed_at=datetime(2026, 1, 2, tzinfo=UTC),
    output={"answer": 42},
    error_message=None,
    callback_delivery=uuid.UUID("5d1c2b3a-4e5f-4a6b-8c7d-9e0f1a2b3c4d"),
)


def delivery(timestamp: int) -> tuple[bytes, dict[str, str]]:
    """A delivery of RUN's end as MAOF sends it (chalicelib/engine/callbacks.py)."""
    body = dumps(payload(RUN, "head", timestamp)).encode("utf-8")
    return body, {
        "X-Maof-Signature": signature(SECRET, body),
        "X-Maof-Timestamp": str(timestamp),
        "X-Maof-Delivery": str(RUN.callback_delivery),
    }


def test_the_documented_verifier_accepts_a_delivery_maof_signed() -> None:
    body, headers = delivery(int(time.time()))
    verified = documented_verify()(body, headers, SECRET)
    assert verified["output"] == {"answer": 42}
    assert verified["deliveryId"] == headers["X-Maof-Delivery"]


def test_the_documented_verifier_refuses_a_delivery_replayed_under_another_delivery_id() -> None:
    """Receivers drop repeats by the delivery id: unsigned (a header alone), a delivery
    captured and replayed within max_age under a fresh X-Maof-Delivery passed both the
    verifier and the de-duplication."""
    body, headers = delivery(int(time.time()))
    replayed = headers | {"X-Maof-Delivery": str(uuid.uuid4())}
    with pytest.raises(ValueError, match="replayed"):
        documented_verify()(body, replayed, SECRET)


def test_the_documented_verifier_refuses_a_wrong_secret_a_changed_body_or_an_old_delivery() -> None:
    verify = documented_verify()
    body, headers = delivery(int(time.time()))
    with pytest.raises(ValueError, match="signature"):
        verify(body, headers, "another-secret-0123456789")
    with pytest.raises(ValueError, match="signature"):
        verify(body.replace(b"completed", b"failed"), headers, SECRET)
    old_body, old_headers = delivery(int(time.time()) - 3600)
    with pytest.raises(ValueError, match="stale"):
        verify(old_body, old_headers, SECRET)
