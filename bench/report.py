"""Headline figures (each with its floor and target) and the Markdown table."""

from __future__ import annotations

import math
from typing import Any

from bench.capacity import TRACE_PARTS, UNLIMITED_SLOTS

# The TypeScript MVP on a machine of this kind (2 cores), 50 ms mocked agents (issue #7).
DASH = "\u2013"

MVP = {
    "single_e2e_ms": 179.0,
    "drain_workflows_per_s": 6.2,
    "execute_p50_ms": 4.0,
    "execute_p99_ms": 11.0,
}


def _ratio(value: float | None, floor: float | None) -> float | None:
    if value is None or not floor:
        return None
    return round(value / floor, 2)


def _single(result: dict[str, Any], delay: int) -> dict[str, Any] | None:
    for item in result.get("single", {}).get("results", []):
        if item["mock_agent_delay_ms"] == delay:
            return dict(item)
    return None


def _drain(
    result: dict[str, Any], workflow: str, delay: int, concurrency: int
) -> dict[str, Any] | None:
    for item in result.get("drain", []):
        if (item["workflow"], item["mock_agent_delay_ms"], item["poller_concurrency"]) == (
            workflow,
            delay,
            concurrency,
        ):
            return dict(item)
    return None


def headlines(result: dict[str, Any]) -> list[dict[str, Any]]:
    """[{name, value, unit, floor, ratio, target, met}] for the issue's targets."""
    floors = result.get("floors", {})
    rows: list[dict[str, Any]] = []
    idle = _single(result, 0)
    if idle:
        value = idle["per_stage_overhead"]["p50"]
        interleaved = idle["interleaved_floor"]["stage_floor_ms"]
        ratio = _ratio(value, interleaved)
        rows.append(
            {
                "name": "Per-stage orchestration overhead, p50 (single, 0 ms agent)",
                "value": value,
                "unit": "ms",
                "floor": interleaved,
                "floor_name": "SQS hop + stage transaction, sampled between the runs",
                "ratio": ratio,
                "target": "≤ 2x floor",
                "met": ratio is not None and ratio <= 2.0,
            }
        )
    mocked = _single(result, 50)
    if mocked:
        value = mocked["end_to_end"]["p50"]
        agent_floor = 150.0 + 3 * mocked["interleaved_floor"]["stage_floor_ms"]
        rows.append(
            {
                "name": "3-stage workflow end to end, p50 (single, 50 ms agents)",
                "value": value,
                "unit": "ms",
                "floor": round(agent_floor, 1),
                "floor_name": "3 x (50 ms + stage floor)",
                "ratio": _ratio(value, agent_floor),
                "target": f"MVP: {MVP['single_e2e_ms']:.0f} ms",
                "met": value < MVP["single_e2e_ms"],
            }
        )
    drain = _drain(result, "linear3", 50, 16)
    if drain:
        name = "Drain, 3-stage, 50 ms agents, poller concurrency 16"
        rows.append(_throughput_row(name, drain["workflows_per_s"], "workflows/s", drain))
    rows += _capacity_headlines(result)
    submit = result.get("submit", {})
    in_process = submit.get("in_process")
    if in_process:
        value = in_process["execute_handler_excl_sqs"]["p50"]
        floor = floors.get("chalice_route_in_process", {}).get("p50")
        rows.append(
            {
                "name": "POST /workflows/execute handler in process, excl. SQS send, p50",
                "value": value,
                "unit": "ms",
                "floor": floor,
                "floor_name": "bare Chalice route in process",
                "ratio": _ratio(value, floor),
                "target": "≤ 5 ms",
                "met": value <= 5.0,
            }
        )
        rows.append(
            {
                "name": "… its SQS send to LocalStack, p50",
                "value": in_process["execute_sqs_send"]["p50"],
                "unit": "ms",
                "floor": floors.get("sqs", {}).get("send", {}).get("p50"),
                "floor_name": "bare SQS send",
                "ratio": _ratio(
                    in_process["execute_sqs_send"]["p50"],
                    floors.get("sqs", {}).get("send", {}).get("p50"),
                ),
                "target": "reported",
                "met": None,
            }
        )
    http = submit.get("http")
    if http:
        latency = http["execute_sequential"]
        bare = http["bare_route_sequential"]["p50"]
        rows.append(
            {
                "name": "POST /workflows/execute over HTTP (local server, TCP_NODELAY), p50 / p99",
                "value": f"{latency['p50']} / {latency['p99']}",
                "unit": "ms",
                "floor": bare,
                "floor_name": "bare Chalice route, same server, p50",
                "ratio": _ratio(latency["p50"], bare),
                "target": f"MVP: {MVP['execute_p50_ms']:.0f} / {MVP['execute_p99_ms']:.0f} ms",
                "met": None,
            }
        )
    cold = result.get("coldstart")
    if cold:
        for key, label in (("api", "API function"), ("run_stage", "run_stage function")):
            value = cold[key]["cold_start_ms"]
            rows.append(
                {
                    "name": f"Cold start, {label} (interpreter + import app + first request)",
                    "value": value,
                    "unit": "ms",
                    "floor": cold["interpreter_start_ms"],
                    "floor_name": "bare interpreter start",
                    "ratio": _ratio(value, cold["interpreter_start_ms"]),
                    "target": "< 1000 ms",
                    "met": value < 1000,
                }
            )
    return rows


def _capacity_drains(result: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    capacity = result.get("capacity") or {}
    drains = capacity.get("drains", [])
    limited = [d for d in drains if d["slots_per_agent"] == capacity.get("slots")]
    unlimited = [d for d in drains if d["slots_per_agent"] != capacity.get("slots")]
    return limited, unlimited


def _lower_median(values: list[float]) -> float | None:
    """The median; of an even count, the lower of the middle two (no flattering)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else None


def _median_of(drains: list[dict[str, Any]], key: str) -> float | None:
    return _lower_median([d[key] for d in drains if d.get(key) is not None])


def _throughput_row(
    name: str, value: float | None, unit: str, drain: dict[str, Any]
) -> dict[str, Any]:
    """A drain's throughput against the target of 10x the MVP's, all of it verified."""
    target = 10 * MVP["drain_workflows_per_s"]
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "floor": None,
        "floor_name": "",
        "ratio": round(value / MVP["drain_workflows_per_s"], 1) if value else None,
        "ratio_name": "x MVP",
        "target": f"≥ {target:.0f}/s (10x MVP), none failed or stranded",
        "met": bool(value and value >= target and drain["verified"]),
    }


def _capacity_headlines(result: dict[str, Any]) -> list[dict[str, Any]]:
    capacity = result.get("capacity")
    if not capacity:
        return []
    rows: list[dict[str, Any]] = []
    limited, unlimited = _capacity_drains(result)
    where = "through make dev's API and poller" + (
        " (settings overridden)" if capacity.get("dev_settings_overridden") else ""
    )
    slots, delay = capacity["slots"], capacity["agent_delay_ms"]
    if limited:
        value = _median_of(limited, "slot_utilisation")
        drain = next(d for d in limited if d["slot_utilisation"] == value)
        rows.append(
            {
                "name": f"Capacity drain, 3 HTTP agents x {slots} slots x {delay} ms, "
                f"{drain['runs']} 3-stage runs {where}: slot utilisation",
                "value": f"{value * 100:.0f}% ({drain['runs_per_s']} runs/s, "
                f"{drain['stages_per_s']} stages/s of {drain['slot_capacity_stages_per_s']:g})",
                "unit": "",
                "floor": None,
                "floor_name": "",
                "ratio": None,
                "target": "≥ 90% where the machine is not the bottleneck",
                "met": value >= 0.9 and drain["verified"],
            }
        )
    if paced := capacity.get("paced"):
        cores, busy = paced["machine_cores"], paced["machine_cores_busy"]
        # Not the bottleneck: the whole machine (every process on it) under 3/4 busy.
        idle_enough = busy is not None and busy <= 0.75 * cores
        rows.append(
            {
                "name": f"… the same with agents at {paced['agent_delay_ms']} ms (their "
                f"slots, not the machine, the limit): slot utilisation",
                "value": f"{paced['slot_utilisation'] * 100:.0f}% ({paced['runs_per_s']} "
                f"runs/s, {paced['stages_per_s']} stages/s of "
                f"{paced['slot_capacity_stages_per_s']:g}; the machine {_fmt(busy)} of "
                f"{cores} cores busy)",
                "unit": "",
                "floor": None,
                "floor_name": "",
                "ratio": None,
                "target": "≥ 90% where the machine is not the bottleneck",
                "met": paced["slot_utilisation"] >= 0.9 and paced["verified"] and idle_enough,
            }
        )
    if limited and unlimited:
        ratios = capacity.get("limited_to_unlimited") or []
        value = _lower_median(ratios)
        rows.append(
            {
                "name": f"… capacity-limited ÷ unlimited ({UNLIMITED_SLOTS} slots), same run",
                "value": value,
                "unit": "x",
                "floor": None,
                "floor_name": "",
                "ratio": None,
                "target": "≥ 0.9",
                "met": value is not None and value >= 0.9,
            }
        )
    if unlimited:
        value = _median_of(unlimited, "runs_per_s")
        drain = next(d for d in unlimited if d["runs_per_s"] == value)
        name = f"Unlimited drain ({UNLIMITED_SLOTS} slots), {drain['runs']} runs {where}"
        rows.append(_throughput_row(name, value, "runs/s", drain))
    single = capacity.get("single")
    if single:
        in_process = _single(result, delay)
        rows.append(
            {
                "name": f"One 3-stage run {where}, {delay} ms HTTP agents, p50 client-side "
                "/ server-side",
                "value": f"{single['client_side']['p50']} / {single['server_side']['p50']}",
                "unit": "ms",
                "floor": in_process["end_to_end"]["p50"] if in_process else None,
                "floor_name": f"the single scenario, in process, {delay} ms mock agents",
                "ratio": _ratio(single["client_side"]["p50"], in_process["end_to_end"]["p50"])
                if in_process
                else None,
                "target": f"as in process; MVP {MVP['single_e2e_ms']:.0f} ms",
                "met": None,
            }
        )
    return rows


# Published us-east-1 prices (free tiers left out), as cited in docs/benchmarks.md's cost model.
PRICES = {
    "api_gateway_rest_per_request": 3.50 / 1e6,  # first 333 M a month
    "lambda_per_request": 0.20 / 1e6,
    "lambda_per_gb_second": 0.0000166667,  # x86
    "sqs_per_request": 0.40 / 1e6,  # standard queue, per 64 KB chunk of a request
    "step_functions_standard_per_transition": 0.025 / 1000,
}
LAMBDA_GB = 512 / 1024  # .chalice/config.json, prod: lambda_memory_size 512


def cost_model(result: dict[str, Any]) -> dict[str, Any] | None:
    """AWS cost per 1,000 three-stage runs at the measured handler times and request counts."""
    submit = result.get("submit", {}).get("in_process")
    if not submit:
        return None
    api_ms = math.ceil(submit["execute_handler_total"]["p50"])  # billed per started ms
    cases = []
    for label, source in (
        ("idle: one run at a time (single, 50 ms agents)", _single(result, 50)),
        # Concurrency 1: one execution at a time in the process, as in one Lambda container
        # (at 16 the local executions share one interpreter and inflate each other's time).
        (
            "busy: full batches of 10 (drain, 50 ms agents, concurrency 1)",
            _drain(result, "linear3", 50, 1),
        ),
    ):
        if not source or "run_stage_lambda" not in source:
            continue
        stage = source["run_stage_lambda"]
        sqs_requests = sum(
            count for name, count in source["sqs_requests_per_run"].items() if "empty" not in name
        )
        per_run = {
            "api_gateway": PRICES["api_gateway_rest_per_request"],
            "lambda_api": PRICES["lambda_per_request"]
            + api_ms / 1000 * LAMBDA_GB * PRICES["lambda_per_gb_second"],
            "lambda_run_stage": stage["invocations_per_run"] * PRICES["lambda_per_request"]
            + stage["billed_ms_per_run"] / 1000 * LAMBDA_GB * PRICES["lambda_per_gb_second"],
            "sqs": sqs_requests * PRICES["sqs_per_request"],
        }
        cases.append(
            {
                "case": label,
                "api_handler_billed_ms": api_ms,
                "run_stage_invocations_per_run": stage["invocations_per_run"],
                "run_stage_billed_ms_per_run": stage["billed_ms_per_run"],
                "sqs_requests_per_run": round(sqs_requests, 2),
                "usd_per_1000_runs": {k: round(v * 1000, 6) for k, v in per_run.items()},
                "usd_per_1000_runs_total": round(sum(per_run.values()) * 1000, 6),
            }
        )
    step_functions = 3 * PRICES["step_functions_standard_per_transition"] * 1000
    return {
        "prices": PRICES,
        "lambda_memory_gb": LAMBDA_GB,
        "maof": cases,
        "step_functions_standard_usd_per_1000_runs": round(step_functions, 6),
        "step_functions_note": "3 state transitions a run (one per Task state), transitions only: "
        "the agents' calls (Lambda or HTTP tasks) and the API request that starts it are extra",
    }


def _fmt(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: DASH}[value]


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        "# MAOF benchmark results",
        "",
        f"Run {result['started_at']} (`make bench`, {result['duration_s']:.0f} s). "
        f"Git {machine['git']['commit']}{' (with uncommitted changes)' if machine['git']['dirty'] else ''}. "
        f"Knobs: `{result['argv']}`."
        + (
            " Database `{database}`, queue `{queue}`, Redis db {redis_db}.".format(
                **result["bench_stack"]
            )
            if result.get("bench_stack")
            else ""
        ),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {machine['cpu_model']}, {machine['cores']} cores |",
        f"| RAM | {machine['ram_gb']} GB |",
        f"| OS | {machine['os']} |",
        f"| Python | {machine['python']} |",
        f"| Postgres | {machine['postgres']} |",
        f"| Redis | {machine['redis']} |",
        f"| LocalStack | {machine['localstack']} |",
        "| Libraries | " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + " |",
        f"| Load average (1, 5, 15 min) | at start {machine['load_average_at_start']}, "
        f"at end {result.get('load_average_at_end')} |",
        "",
        "## Headlines",
        "",
        "| Figure | Value | Floor (same run) | Ratio | Target | Met |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["headlines"]:
        floor = (
            f"{_fmt(row['floor'])} ms ({row['floor_name']})" if row["floor"] is not None else DASH
        )
        ratio = _fmt(row["ratio"]) + (
            f" {row['ratio_name']}"
            if row.get("ratio_name") and row["ratio"] is not None
            else "x"
            if row["ratio"] is not None
            else ""
        )
        lines.append(
            f"| {row['name']} | {_fmt(row['value'])} {row['unit']} | {floor} | {ratio} | "
            f"{row['target']} | {_met(row['met'])} |"
        )
    floors = result.get("floors")
    if floors:
        sqs = floors["sqs"]
        lines += [
            "",
            "## Floors",
            "",
            "| Floor | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|",
            _row("SQS hop: send → received (long poll) → deleted", sqs["hop"]),
            _row("… send", sqs["send"]),
            _row("… send → received", sqs["send_to_received"]),
            _row("… delete", sqs["delete"]),
            _row(
                "Stage transaction: UPDATE … RETURNING + INSERT", floors["postgres"]["transaction"]
            ),
            _row(
                "Chalice route in process (API Gateway event)", floors["chalice_route_in_process"]
            ),
            _row("Redis PING", floors["redis_ping"]),
            "",
            f"Stage floor (SQS hop p50 + stage transaction p50): **{floors['stage_floor_ms']} ms**.",
        ]
    single = result.get("single")
    if single:
        lines += [
            "",
            f"## single: one 3-stage workflow on an idle stack (poller concurrency {single['poller_concurrency']})",
            "",
            "Per stage, from the engine's probes (`chalicelib/engine/trace.py`), p50 ms:",
            "",
            "| Agent | End to end p50 / p95 | Overhead per stage p50 | Stage floor (interleaved) | submit | queue hop | claim | dispatch | agent | complete | send |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for item in single["results"]:
            split = item["per_stage_split"]
            lines.append(
                f"| {item['mock_agent_delay_ms']} ms | {item['end_to_end']['p50']} / {item['end_to_end']['p95']} | "
                f"{item['per_stage_overhead']['p50']} | {item['interleaved_floor']['stage_floor_ms']} | "
                + " | ".join(
                    _fmt(split.get(k, {}).get("p50"))
                    for k in (
                        "submit",
                        "queue_hop",
                        "claim",
                        "dispatch",
                        "agent",
                        "complete",
                        "send",
                    )
                )
                + " |"
            )
        lines += [
            "",
            "`submit` is `POST /workflows/execute` over HTTP to the API's own process (once per "
            "run); `queue hop` runs from the previous send's (or the submit's) return to a worker "
            "holding the message (about 0 when the long poll wakes before the sender's call "
            "returns); `send` is the next stage's SQS send (none after the last stage). Overhead "
            "per stage = (end to end - agent time) / 3.",
        ]
    drain = result.get("drain")
    if drain:
        lines += [
            "",
            "## drain: N workflows queued at once, drained by the poller",
            "",
            "| Workflow | Runs | Agent | Concurrency | Workflows/s | Stages/s | From drain start p50 / p95 / p99 ms | Run span p50 / p95 / p99 ms | Stages per invocation | Verified |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for item in drain:
            f, s = item["from_drain_start"], item["run_span"]
            waits = item["audit_actions"].get("wait", 0)
            lines.append(
                f"| {item['workflow']} | {item['runs']} | {item['mock_agent_delay_ms']} ms | "
                f"{item['poller_concurrency']} | {item['workflows_per_s']} | {item['stages_per_s']} | "
                f"{f.get('p50')} / {f.get('p95')} / {f.get('p99')} | {s.get('p50')} / {s.get('p95')} / {s.get('p99')} | "
                f"{item['records_per_invocation']} | "
                f"{'yes' if item['verified'] else '**NO**'}{f' ({waits} waits)' if waits else ''} |"
            )
        lines += [
            "",
            "Verified: every run and stage completed, the queue empty, no record reported failed. "
            "`linear3` = extract → transform → summarize; `fan10` = 1 → 10 → 1 (12 stages).",
            "",
            "Where the machine's time goes during each drain: CPU ms per stage by process "
            "(`maof` = the engine, the app and the poller, one Python process), cores busy, "
            "and the run_stage invocations as Lambda would bill them:",
            "",
            "| Workflow | Agent | Concurrency | CPU ms/stage maof / LocalStack / Postgres / Redis | Cores busy (same order) | run_stage invocation p50 ms | SQS requests per run |",
            "|---|---|---|---|---|---|---|",
        ]
        for item in drain:
            c, b = item.get("cpu_ms_per_stage", {}), item.get("cpu_cores_busy", {})
            order = ("maof", "localstack", "postgres", "redis")
            sqs = sum(
                v for k, v in item.get("sqs_requests_per_run", {}).items() if "empty" not in k
            )
            lines.append(
                f"| {item['workflow']} | {item['mock_agent_delay_ms']} ms | {item['poller_concurrency']} | "
                + " / ".join(_fmt(c.get(k)) for k in order)
                + " | "
                + " / ".join(_fmt(b.get(k)) for k in order)
                + f" | {item.get('run_stage_lambda', {}).get('duration', {}).get('p50')} | {round(sqs, 2)} |"
            )
    lines += _capacity_markdown(result)
    submit = result.get("submit")
    if submit:
        ip, http = submit["in_process"], submit["http"]
        lines += [
            "",
            "## submit and read",
            "",
            "| Measure | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|",
            _row(
                "POST /workflows/execute, handler in process (total)", ip["execute_handler_total"]
            ),
            _row("… of which the SQS send to LocalStack", ip["execute_sqs_send"]),
            _row("… handler excluding the SQS send", ip["execute_handler_excl_sqs"]),
            _row("GET /workflows/{id}, handler in process", ip["get_run_handler"]),
            _row("POST /workflows/execute over HTTP, one client", http["execute_sequential"]),
            _row("GET /workflows/{id} over HTTP, one client", http["get_run_sequential"]),
            _row("Bare Chalice route over HTTP, one client", http["bare_route_sequential"]),
        ]
        shipped = submit.get("http_as_shipped")
        if shipped:
            lines += [
                _row(
                    "POST /workflows/execute over HTTP, server as shipped (Nagle on)",
                    shipped["execute_sequential"],
                ),
                _row(
                    "GET /workflows/{id} over HTTP, server as shipped",
                    shipped["get_run_sequential"],
                ),
                _row(
                    "Bare Chalice route over HTTP, server as shipped",
                    shipped["bare_route_sequential"],
                ),
            ]
        lines += [
            "",
            "Over HTTP: Chalice's local server (`devstack.api`) in its own process, "
            "`requests` with keep-alive. The server as shipped answers every keep-alive request "
            "~40 ms late whatever the app (Nagle's algorithm against the client's delayed ACK, "
            "see `bench/serve.py`); the rows without that note set TCP_NODELAY.",
            "",
            "| Over HTTP, concurrent clients | Clients | Requests/s | p50 ms | p99 ms | Errors |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in (
            ("execute_concurrent", "POST /workflows/execute"),
            ("get_run_concurrent", "GET /workflows/{id}"),
            ("bare_route_concurrent", "Bare Chalice route"),
        ):
            c = http[key]
            lines.append(
                f"| {label} | {c['clients']} | {c['requests_per_s']} | {c['latency'].get('p50')} | "
                f"{c['latency'].get('p99')} | {c['errors']} |"
            )
    cold = result.get("coldstart")
    if cold:
        lines += [
            "",
            "## cold start",
            "",
            "| Function | Interpreter ms | import app ms | First request ms | Cold start ms | Second request ms |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in (
            ("api", "API (`POST /workflows/execute`)"),
            ("run_stage", "run_stage (one stage message)"),
        ):
            c = cold[key]
            lines.append(
                f"| {label} | {cold['interpreter_start_ms']} | {c['import_app_ms']} | "
                f"{c['first_request_ms']} | **{c['cold_start_ms']}** | {c['second_request_ms']} |"
            )
        profile = cold["import_profile"]
        lines += [
            "",
            f"`python -X importtime -c 'import app'`: {profile['total_ms']} ms of imports, by top-level package:",
            "",
            "| Package | ms | Share |",
            "|---|---|---|",
        ]
        for item in profile["by_package_ms"]:
            lines.append(f"| {item['package']} | {item['ms']} | {item['share'] * 100:.1f}% |")
        package = cold.get("package")
        if package and "zip_mb" in package:
            lines += [
                "",
                f"Deployment package (`chalice package --stage prod`): {package['zip_mb']} MB zipped, "
                f"{package['unzipped_mb']} MB unzipped, {package['files']} files.",
            ]
        elif package:
            lines += ["", f"Deployment package: failed ({package.get('error', '')[:200]})."]
    costs = result.get("cost_model")
    if costs:
        lines += [
            "",
            "## AWS cost per 1,000 three-stage runs (us-east-1 list prices, measured times)",
            "",
            "| Case | API Gateway | Lambda (API) | Lambda (run_stage) | SQS | Total | run_stage invocations / billed ms per run | SQS requests per run |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for case in costs["maof"]:
            usd = case["usd_per_1000_runs"]
            lines.append(
                f"| MAOF, {case['case']} | ${usd['api_gateway']:.4f} | ${usd['lambda_api']:.4f} | "
                f"${usd['lambda_run_stage']:.4f} | ${usd['sqs']:.4f} | **${case['usd_per_1000_runs_total']:.4f}** | "
                f"{case['run_stage_invocations_per_run']} / {case['run_stage_billed_ms_per_run']} | "
                f"{case['sqs_requests_per_run']} |"
            )
        lines.append(
            f"| Step Functions Standard, same workflow | | | | | **${costs['step_functions_standard_usd_per_1000_runs']:.4f}** | "
            "3 state transitions per run, transitions only | |"
        )
        lines += [
            "",
            "Lambda at 512 MB (the prod stage), each invocation's measured duration rounded up to "
            "the millisecond; the API function's at the in-process p50 of `POST /workflows/execute` "
            "(with its SQS send). run_stage durations include the time spent waiting for the "
            "(mocked, 50 ms) agents. Postgres and Redis are fixed monthly costs and are not included.",
        ]
    return "\n".join(lines) + "\n"


CAPACITY_GROUPS = ("api", "poller", "agents", "postgres", "redis", "localstack", "maof")


def _all_drains(capacity: dict[str, Any]) -> list[dict[str, Any]]:
    """The drains at the scenario's agent delay, then the paced one (slower agents)."""
    return [*capacity["drains"], *([capacity["paced"]] if capacity.get("paced") else [])]


def _slots_label(capacity: dict[str, Any], drain: dict[str, Any]) -> str:
    delay = drain["agent_delay_ms"]
    paced = delay != capacity["agent_delay_ms"]
    return f"{drain['slots_per_agent']}" + (f" (agents at {delay} ms)" if paced else "")


def _capacity_markdown(result: dict[str, Any]) -> list[str]:
    capacity = result.get("capacity")
    if not capacity:
        return []
    poller = capacity["poller"]
    overridden = capacity.get("dev_settings_overridden") or {}
    lines = [
        "",
        "## capacity: make dev's services driving agents with few slots",
        "",
        f"The API (`devstack.api`) and the poller (`devstack.poller`: "
        f"{poller['concurrency']} executions at most, batches of up to {poller['batch_size']}, "
        f"{poller['wait_seconds']} s long polls, "
        f"{poller.get('database_connections_kept', DASH)} database connections kept, "
        f"{poller.get('processes', 1)} process(es)) in processes of their own"
        + (
            f", with {', '.join(f'{k}={v}' for k, v in overridden.items())} instead of make "
            "dev's defaults"
            if overridden
            else ", with make dev's defaults"
        )
        + f"; three agents (`bench/agent.py`, {capacity['agent_delay_ms']} ms, one process "
        "each, one capability each of extract → translate → summarize) over HTTP. The runs are "
        "submitted at once over HTTP; the clock runs from the first submit to the last run "
        "completed.",
        "",
        "| Slots per agent | Runs | Runs/s | Stages/s | Slot utilisation | Agents: every slot busy / none busy (share of the drain) | Run time p50 / p95 ms | Submitting took s | Verified |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in _all_drains(capacity):
        agents = d["agents_seen"]
        busy = " · ".join(
            f"{a.get('all_slots_busy', 0) * 100:.0f}% / {a.get('no_slot_busy', 0) * 100:.0f}%"
            for a in agents
        )
        waits = d["audit_actions"].get("wait", 0)
        lines.append(
            f"| {_slots_label(capacity, d)} | {d['runs']} | {d['runs_per_s']} | {d['stages_per_s']} | "
            f"{d['slot_utilisation'] * 100:.0f}% of {d['slot_capacity_stages_per_s']:g} stages/s | "
            f"{busy} | {d['run_time'].get('p50')} / {d['run_time'].get('p95')} | "
            f"{d['submit_seconds']} | {'yes' if d['verified'] else '**NO**'}"
            f"{f' ({waits} stages waited)' if waits else ''} |"
        )
    ratios = capacity.get("limited_to_unlimited") or []
    lines += [
        "",
        "Slot utilisation = stages/s ÷ (agents x slots ÷ agent delay). Verified: every run and "
        "stage completed, the queue empty, and no agent ever had more calls at once than its "
        "slots (as the agent counted them). Capacity-limited ÷ unlimited, stages/s: "
        + (", ".join(f"{r:g}" for r in ratios) or DASH)
        + ".",
        "",
        "CPU ms per stage by process, and cores busy (`bench` is the benchmark's own process: "
        "the submitting clients and the polling for the end; Postgres and LocalStack serve "
        "other clients of the shared stack too; the machine column counts every process):",
        "",
        "| Slots per agent | CPU ms/stage "
        + " / ".join(_group_name(g) for g in CAPACITY_GROUPS)
        + " | Cores busy (same order) | Machine cores busy |",
        "|---|---|---|---|",
    ]
    for d in _all_drains(capacity):
        c, b = d.get("cpu_ms_per_stage", {}), d.get("cpu_cores_busy", {})
        lines.append(
            f"| {_slots_label(capacity, d)} | "
            + " / ".join(_fmt(c.get(g)) for g in CAPACITY_GROUPS)
            + " | "
            + " / ".join(_fmt(b.get(g)) for g in CAPACITY_GROUPS)
            + f" | {_fmt(d.get('machine_cores_busy'))} of {d.get('machine_cores')} |"
        )
    traced = [d for d in capacity["drains"] if d.get("trace_split")]
    if traced:
        lines += [
            "",
            "Where a stage's time went (`--capacity-trace`: the poller's probes recorded, "
            "chalicelib/engine/trace.py), p50 / p95 ms:",
            "",
            "| Slots per agent | " + " | ".join(name for name, _ in TRACE_PARTS) + " |",
            "|---" * (len(TRACE_PARTS) + 1) + "|",
        ]
        for d in traced:
            split = d["trace_split"]
            lines.append(
                f"| {d['slots_per_agent']} | "
                + " | ".join(
                    f"{_fmt(split[name].get('p50'))} / {_fmt(split[name].get('p95'))}"
                    for name, _ in TRACE_PARTS
                )
                + " |"
            )
        lines += [
            "",
            "; ".join(f"`{name}`: {meaning}" for name, meaning in TRACE_PARTS) + ".",
        ]
    single = capacity.get("single")
    if single:
        split = single["per_stage"]
        in_process = _single(result, capacity["agent_delay_ms"])
        lines += [
            "",
            f"One run at a time through the same services ({single['runs']} runs, "
            f"{capacity['agent_delay_ms']} ms agents answering in "
            f"{single['agent_answer_ms_mean']} ms on their side), p50 / p95 ms:",
            "",
            "| Measure | p50 | p95 |",
            "|---|---|---|",
            _row2("Client-side: POST sent → run completed", single["client_side"]),
            _row2("Server-side: run created → completed", single["server_side"]),
            _row2("POST /workflows/execute answered (client-side)", single["submit_http"]),
            _row2(
                "Per stage: queued → claimed (the SQS hop and the claim)",
                split["queued_to_claimed"],
            ),
            _row2(
                "Per stage: claimed → completed (the agent's call and the engine around it)",
                split["claimed_to_completed"],
            ),
            "",
            f"Orchestration per stage, p50: {single['orchestration_per_stage_ms_p50']} ms "
            "((server-side - 3 x the agents' answer time) ÷ 3)."
            + (
                f" In process (the single scenario, {capacity['agent_delay_ms']} ms mock agents, "
                f"same run): {in_process['end_to_end']['p50']} ms end to end p50."
                if in_process
                else ""
            ),
        ]
    return lines


def _group_name(group: str) -> str:
    return {"maof": "bench", "localstack": "LocalStack", "api": "API"}.get(
        group, group.capitalize() if group in ("postgres", "redis") else group
    )


def _row2(label: str, stats: dict[str, Any]) -> str:
    return f"| {label} | {_fmt(stats.get('p50'))} | {_fmt(stats.get('p95'))} |"


def _row(label: str, stats: dict[str, Any]) -> str:
    return f"| {label} | {_fmt(stats.get('p50'))} | {_fmt(stats.get('p95'))} | {_fmt(stats.get('p99'))} |"
