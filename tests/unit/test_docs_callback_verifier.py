"""The ten-line verifier docs/api.md gives receivers of completion callbacks works on what
MAOF signs (chalicelib/engine/callbacks.py), and refuses what it must."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from chalicelib.engine.callbacks import signature

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
SECRET = "a-callback-secret-0123456789"


def documented_verify() -> Any:
    text = API_DOC.read_text()
    block = re.search(r"To verify a delivery:\n\n```python\n(.*?)```", text, re.S)
    assert block, "docs/api.md shows a verifier"
    namespace: dict[str, Any] = {}
    exec(block.group(1), namespace)  # noqa: S102 (our own docs, under test)
    return namespace["verify"]


def delivery(timestamp: int) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps({"workflowRunId": "wfr-1", "status": "completed", "timestamp": timestamp})
    body = raw.encode()
    return body, {
        "X-Maof-Signature": signature(SECRET, body),
        "X-Maof-Timestamp": str(timestamp),
        "X-Maof-Delivery": "d-1",
    }


def test_the_documented_verifier_accepts_a_delivery_maof_signed() -> None:
    body, headers = delivery(int(time.time()))
    assert documented_verify()(body, headers, SECRET)["workflowRunId"] == "wfr-1"


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
