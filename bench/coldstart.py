"""cold start: what a fresh Lambda execution environment pays before answering.

Each sample is a fresh interpreter (`python -c …`, as Lambda's runtime starts one) that
imports `app` and serves its first request — an authenticated `POST /workflows/execute`
for the API function, one stage message for `run_stage` — then a second one (warm). The
interpreter's own start is measured apart (`python -c pass`). Where import time goes
comes from `python -X importtime -c "import app"`, summed by top-level package. The
deployment package is `chalice package --stage prod`'s zip.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import WORKFLOW_INPUT, InProcessApi, linear3, rest_event

PROJECT_DIR = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
started = time.perf_counter()
sys.path.insert(0, os.getcwd())
import app as maof
imported = time.perf_counter()
from bench.common import LambdaContext
events = json.loads(os.environ["BENCH_COLD_EVENTS"])
if os.environ["BENCH_COLD_KIND"] == "api":
    handler = maof.app
else:
    handler = maof.app.handler_map["run_stage"]
first = handler(events[0], LambdaContext())
served = time.perf_counter()
second = handler(events[1], LambdaContext())
again = time.perf_counter()
print(json.dumps({
    "import_s": imported - started,
    "first_s": served - imported,
    "second_s": again - served,
    "first": first if os.environ["BENCH_COLD_KIND"] != "api" else first["statusCode"],
    "second": second if os.environ["BENCH_COLD_KIND"] != "api" else second["statusCode"],
}))
"""


def _python(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT_DIR,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _interpreter_start(samples: int) -> float:
    durations = []
    for _ in range(samples):
        started = time.perf_counter()
        _python(["-c", "pass"])
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def _stage_events(api: InProcessApi) -> list[dict[str, Any]]:
    """SQS events for the first stage of two fresh runs (their messages are also queued;
    the queue is emptied afterwards)."""
    from chalicelib.workflows import runs

    real = runs.send_stage_messages
    runs.send_stage_messages = lambda *a, **k: None  # type: ignore[assignment]
    try:
        ids = [str(_submit(api)) for _ in range(2)]
    finally:
        runs.send_stage_messages = real  # type: ignore[assignment]
    return [
        {
            "Records": [
                {
                    "messageId": str(uuid.uuid4()),
                    "receiptHandle": "cold",
                    "body": json.dumps({"runId": run_id, "stageId": "extract"}),
                    "attributes": {"ApproximateReceiveCount": "1"},
                    "messageAttributes": {},
                    "md5OfBody": "",
                    "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:bench",
                    "awsRegion": "us-east-1",
                }
            ]
        }
        for run_id in ids
    ]


def _submit(api: InProcessApi) -> uuid.UUID:
    from bench.common import submit

    return submit(api, linear3())


def _samples(kind: str, events: list[list[dict[str, Any]]], samples: int) -> dict[str, Any]:
    rows = []
    for index in range(samples):
        env = dict(os.environ)
        env["BENCH_COLD_KIND"] = kind
        env["BENCH_COLD_EVENTS"] = json.dumps(events[index])
        started = time.perf_counter()
        out = _python(["-c", CHILD], env)
        wall = time.perf_counter() - started
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_wall_s"] = wall
        rows.append(row)
    ok = all(
        (r["first"] == 202 and r["second"] == 202)
        if kind == "api"
        else (r["first"] == {"batchItemFailures": []} and r["second"] == {"batchItemFailures": []})
        for r in rows
    )

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in rows) * 1000, 1)

    return {
        "samples": samples,
        "served_ok": ok,
        "import_app_ms": med("import_s"),
        "first_request_ms": med("first_s"),
        "second_request_ms": med("second_s"),
        "process_wall_ms": med("process_wall_s"),
    }


def import_profile(top: int = 14) -> dict[str, Any]:
    """`-X importtime` of `import app`, self time summed by top-level package."""
    out = _python(["-X", "importtime", "-c", "import app"])
    by_package: dict[str, int] = defaultdict(int)
    total = 0
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = line[len("import time:") :].split("|")
        package = name.strip().split(".")[0]
        by_package[package] += int(self_us)
        total += int(self_us)
    ranked = sorted(by_package.items(), key=lambda item: -item[1])
    return {
        "total_ms": round(total / 1000, 1),
        "by_package_ms": [
            {"package": name, "ms": round(us / 1000, 1), "share": round(us / total, 3)}
            for name, us in ranked[:top]
        ],
    }


def package_size() -> dict[str, Any]:
    """`chalice package --stage prod` (placeholder secrets, as `make package` sets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAOF_")}
    env.update(
        {
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": env.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": env.get("AWS_SECRET_ACCESS_KEY", "testing"),
            "MAOF_STAGE": "prod",
            "MAOF_STAGE_QUEUE_NAME": "maof-stage-queue",
            "MAOF_JWT_SECRET": "package-time-placeholder-not-a-secret",
            "MAOF_SECRET_KEY": "package-time-placeholder-not-a-secret",
            "MAOF_DATABASE_URL": "postgresql://package-time-placeholder/maof",
            "MAOF_REDIS_URL": "redis://package-time-placeholder:6379/0",
        }
    )
    chalice = str(Path(sys.executable).parent / "chalice")
    with tempfile.TemporaryDirectory(prefix="maof-bench-package-") as out:
        started = time.perf_counter()
        result = subprocess.run(
            [chalice, "package", "--stage", "prod", out],
            cwd=PROJECT_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            return {"error": (result.stderr or result.stdout)[-2000:]}
        zip_path = Path(out) / "deployment.zip"
        with zipfile.ZipFile(zip_path) as archive:
            unzipped = sum(info.file_size for info in archive.infolist())
            files = len(archive.infolist())
        return {
            "zip_mb": round(zip_path.stat().st_size / 1e6, 2),
            "unzipped_mb": round(unzipped / 1e6, 2),
            "files": files,
            "package_seconds": round(seconds, 1),
        }


def run(api: InProcessApi, samples: int, with_package: bool) -> dict[str, Any]:
    from bench.env import purge_queue

    print(f"cold start: {samples} fresh interpreters per function, import profile, package")
    body = {"workflow": linear3(), "input": WORKFLOW_INPUT}
    api_events = [
        [
            rest_event("POST", "/workflows/execute", "/workflows/execute", None, body, api.token)
            for _ in range(2)
        ]
        for _ in range(samples)
    ]
    stage_events = [_stage_events(api) for _ in range(samples)]
    result: dict[str, Any] = {
        "interpreter_start_ms": round(_interpreter_start(samples) * 1000, 1),
        "api": _samples("api", api_events, samples),
        "run_stage": _samples("run_stage", stage_events, samples),
        "import_profile": import_profile(),
    }
    for key in ("api", "run_stage"):
        part = result[key]
        part["cold_start_ms"] = round(
            result["interpreter_start_ms"] + part["import_app_ms"] + part["first_request_ms"], 1
        )
    if with_package:
        result["package"] = package_size()
    purge_queue()
    return result
