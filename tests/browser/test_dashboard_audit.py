"""The run page's audit panel: signature status, the signed checkpoint, and "Download proof"
(the export bundle, which verifies offline), under the site's strict CSP."""

from __future__ import annotations

import json
from pathlib import Path

from playwright.sync_api import Page, expect

from chalicelib.audit import checkpoints
from chalicelib.audit import verify as rules
from tests.browser.conftest import screenshot, sign_in, unique
from tests.integration.conftest import Api, register_agent, wait_for_run


def test_the_audit_panel_shows_signatures_the_checkpoint_and_downloads_the_proof(
    page: Page, dashboard_url: str, user: Api, poller: object, tmp_path: Path
) -> None:
    capability = unique("proof")
    register_agent(user, capability)
    stages = [
        {"id": "a", "name": "A", "agentCapability": capability},
        {"id": "b", "name": "B", "agentCapability": capability, "dependencies": ["a"]},
    ]
    run_id = user.post(
        "/workflows/execute", {"workflow": {"name": "proof", "stages": stages}, "input": {}}
    ).json()["data"]["workflowRunId"]
    assert wait_for_run(user, run_id)["status"] == "completed"

    # Ended, not yet checkpointed.
    sign_in(page, dashboard_url, user, f"#/runs/{run_id}")
    expect(page.get_by_test_id("audit-chain")).to_have_attribute("data-valid", "true")
    signatures = page.get_by_test_id("audit-signatures")
    expect(signatures).to_have_attribute("data-signed", "4")
    expect(signatures).to_contain_text("4 of 4 entries signed (Ed25519)")
    expect(page.get_by_test_id("audit-checkpoint")).to_have_attribute("data-status", "none")

    number = checkpoints.checkpoint_once()["checkpoint"]
    page.reload()
    checkpoint = page.get_by_test_id("audit-checkpoint")
    expect(checkpoint).to_have_attribute("data-status", "verified")
    expect(checkpoint).to_contain_text(f"In signed checkpoint #{number}")
    screenshot(page, "run-audit-proof")

    with page.expect_download() as download:
        page.get_by_test_id("download-proof").click()
    saved = tmp_path / "proof.json"
    download.value.save_as(saved)
    assert download.value.suggested_filename == f"{run_id}-audit.json"
    bundle = json.loads(saved.read_text())
    report = rules.verify_bundle(bundle)
    assert report.valid, report.problems
    assert [c["checkpoint"] for c in report.checkpoints if c["valid"]] == [number]
