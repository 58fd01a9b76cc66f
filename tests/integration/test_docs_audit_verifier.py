"""docs/audit.md "Verifying a run's audit trail", re-implemented from its words alone: RFC 8785,
SHA-256 and Ed25519 (`cryptography`), no MAOF code in `documented_verify`; on a real run's
bundle it agrees with `maof-verify`, untouched and after each kind of tampering."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tests.integration.conftest import register_agent, unique_capability, wait_for_run

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------ from docs/audit.md only


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def doubles(value: Any) -> Any:  # rule 1: numbers are doubles
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > 2**53 - 1:
        return float(value)
    if isinstance(value, dict):
        return {k: doubles(v) for k, v in value.items()}
    if isinstance(value, list):
        return [doubles(v) for v in value]
    return value


def canonical(value: Any) -> bytes:
    return rfc8785.dumps(doubles(value))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def signed_ok(obj: dict[str, Any], keys: dict[str, Ed25519PublicKey]) -> bool:  # rules 2, 4
    body = {k: v for k, v in obj.items() if k not in ("hash", "signature")}
    if obj.get("hash") != sha256(canonical(body)) or obj.get("kid") not in keys:
        return False
    try:
        keys[obj["kid"]].verify(b64url(obj["signature"]), obj["hash"].encode("ascii"))
    except Exception:
        return False
    return True


def documented_verify(bundle: dict[str, Any], jwks: list[dict[str, Any]]) -> bool:
    keys = {
        k["kid"]: Ed25519PublicKey.from_public_bytes(b64url(k["x"]))
        for k in jwks
        if k["kty"] == "OKP" and k["crv"] == "Ed25519"
    }
    run_id = bundle["run"]["workflowRunId"]
    entries = bundle["entries"]
    prev = "0" * 64
    for seq, entry in enumerate(entries, start=1):  # rule 3
        if entry["seq"] != seq or entry["prevHash"] != prev or entry["runId"] != run_id:
            return False
        if not signed_ok(entry, keys):
            return False
        prev = entry["hash"]
    for item in bundle["outputs"]:  # rule 5
        entry = entries[item["seq"] - 1] if 0 < item["seq"] <= len(entries) else None
        if entry is None or entry["stageId"] != item["stageId"]:
            return False
        if sha256(canonical(item["output"])) != entry["outputHash"]:
            return False
    for cp in bundle["checkpoints"]:  # rule 6
        head, leaf = cp["head"], cp["leaf"]
        if head["format"] != "maof-audit-checkpoint/1" or not signed_ok(head, keys):
            return False
        r = hashlib.sha256(b"\x00" + canonical(leaf)).digest()
        fn, sn = cp["leafIndex"], head["treeSize"] - 1
        for sibling in map(bytes.fromhex, cp["proof"]):
            if sn == 0:
                return False
            if fn % 2 == 1 or fn == sn:
                r = hashlib.sha256(b"\x01" + sibling + r).digest()
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
            else:
                r = hashlib.sha256(b"\x01" + r + sibling).digest()
            fn, sn = fn >> 1, sn >> 1
        if sn != 0 or r.hex() != head["rootHash"] or leaf["runId"] != run_id:
            return False
        if leaf["seq"] > len(entries) or entries[leaf["seq"] - 1]["hash"] != leaf["hash"]:
            return False
    return True


# ------------------------------------------------------------------ against maof-verify


def maof_verify(bundle: dict[str, Any], keys: list[dict[str, Any]], tmp: Path) -> bool:
    (tmp / "b.json").write_text(json.dumps(bundle))
    (tmp / "k.json").write_text(json.dumps({"keys": keys}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chalicelib.audit.verify",
            str(tmp / "b.json"),
            "--key",
            str(tmp / "k.json"),
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def tamperings(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def changed(edit: Any) -> dict[str, Any]:
        copied = copy.deepcopy(bundle)
        edit(copied)
        return copied

    return {
        "an entry's details": changed(lambda b: b["entries"][1]["details"].update(attempt=9)),
        "an entry's kid": changed(lambda b: b["entries"][0].update(kid="other")),
        "a signature": changed(
            lambda b: b["entries"][2].update(signature=b["entries"][1]["signature"])
        ),
        "the tail": changed(lambda b: b["entries"].pop()),
        "an output": changed(lambda b: b["outputs"][0].update(output={"forged": True})),
        "the checkpoint's root": changed(
            lambda b: b["checkpoints"][0]["head"].update(rootHash="00" * 32)
        ),
        "the proof": changed(
            lambda b: b["checkpoints"][0].update(
                proof=[*list(reversed(b["checkpoints"][0]["proof"])), "00" * 32]
            )
        ),
    }


def test_the_documented_rules_agree_with_maof_verify_on_a_real_run(user, poller, api, tmp_path):
    from chalicelib.audit import checkpoints  # to write the checkpoint now, not in a minute

    capability = unique_capability("documented")
    register_agent(user, capability)
    stages = [
        {"id": "a", "name": "A", "agentCapability": capability},
        {"id": "b", "name": "B", "agentCapability": capability, "dependencies": ["a"]},
        {"id": "c", "name": "C", "agentCapability": capability, "dependencies": ["a"]},
    ]
    run = user.post(
        "/workflows/execute",
        {"workflow": {"name": "documented", "stages": stages}, "input": {"q": "ünï", "n": 1.5}},
    ).json()["data"]["workflowRunId"]
    assert wait_for_run(user, run)["status"] == "completed"
    checkpoints.checkpoint_once()
    bundle = user.get(f"/workflows/{run}/audit/export").json()["data"]
    keys = api.get("/audit/keys").json()["data"]["keys"]
    assert bundle["checkpoints"], "the run is checkpointed"

    assert documented_verify(bundle, keys) is True
    assert maof_verify(bundle, keys, tmp_path) is True
    for what, tampered in tamperings(bundle).items():
        assert documented_verify(tampered, keys) is False, what
        assert maof_verify(tampered, keys, tmp_path) is False, what


def test_the_docs_document_the_rules_this_test_implements():
    page = (PROJECT_DIR / "docs" / "audit.md").read_text()
    section = " ".join(page[page.index("## Verifying a run's audit trail") :].split())
    for phrase in (
        "RFC 8785",
        "without its `hash` and `signature`",
        "`prevHash` is 64 zeros",
        "Ed25519 over the ASCII bytes of `hash`, base64url without padding",
        "SHA-256(0x00 ‖ leaf)",
        "SHA-256(0x01 ‖ left ‖ right)",
        "maof-verify bundle.json --key keys.json",
    ):
        assert phrase in section, phrase
