"""`python -m bench` (`make bench`): every scenario against the local stack, results in
bench/results/results.json and bench/results/results.md. See docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import env

SCENARIOS = ("floors", "single", "drain", "capacity", "submit", "coldstart")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="MAOF benchmarks against the local stack."
    )
    parser.add_argument(
        "--scenarios",
        type=_names,
        default=list(SCENARIOS),
        help=f"comma-separated, of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--floor-iterations",
        type=int,
        default=100,
        help="SQS hops measured (5x as many transactions and routes)",
    )
    parser.add_argument("--single-runs", type=int, default=20)
    parser.add_argument(
        "--single-delays",
        type=_ints,
        default=[0, 50],
        help="mock agent delays in ms (MAOF_MOCK_AGENT_DELAY_MS)",
    )
    parser.add_argument("--single-concurrency", type=int, default=4)
    parser.add_argument("--drain-workflows", type=_names, default=["linear3", "fan10"])
    parser.add_argument("--drain-runs-linear3", type=int, default=200)
    parser.add_argument("--drain-runs-fan10", type=int, default=50)
    parser.add_argument("--drain-delays", type=_ints, default=[0, 50])
    parser.add_argument("--drain-concurrency", type=_ints, default=[1, 4, 16])
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds one drain may take before it is reported unfinished",
    )
    parser.add_argument(
        "--capacity-runs", type=int, default=200, help="3-stage runs submitted at once"
    )
    parser.add_argument(
        "--capacity-slots", type=int, default=5, help="maxConcurrentTasks of each agent"
    )
    parser.add_argument("--capacity-delay", type=int, default=50, help="agent delay in ms")
    parser.add_argument(
        "--capacity-clients", type=int, default=8, help="HTTP clients submitting at once"
    )
    parser.add_argument(
        "--capacity-repeats",
        type=int,
        default=2,
        help="pairs of drains (limited, then unlimited) in one run",
    )
    parser.add_argument(
        "--capacity-single-runs",
        type=int,
        default=20,
        help="runs one at a time through make dev's services (0: none)",
    )
    parser.add_argument(
        "--capacity-paced-delay",
        type=int,
        default=500,
        help="agent delay in ms of one more capacity-limited drain, slow enough that the "
        "machine is not the bottleneck (0: none)",
    )
    parser.add_argument(
        "--capacity-trace",
        action="store_true",
        help="record the poller's probes (bench/traced.py) to split each stage's time; "
        "a diagnosis, slightly slower than make dev's poller",
    )
    parser.add_argument(
        "--dev-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a MAOF_* setting for the capacity scenario's API and poller instead of make "
        "dev's default (repeatable; reported with the results)",
    )
    parser.add_argument("--submit-iterations", type=int, default=300)
    parser.add_argument("--http-clients", type=int, default=4)
    parser.add_argument("--http-seconds", type=float, default=5.0)
    parser.add_argument("--cold-samples", type=int, default=5)
    parser.add_argument(
        "--no-package",
        action="store_true",
        help="skip `chalice package` (the deployment package size)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="directory for results.json and results.md"
    )
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    env.configure()
    started = time.time()
    env.prepare()

    from bench import capacity, coldstart, common, drain, floors, machine, report, single, submit

    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": " ".join(["python -m bench", *argv]),
        "bench_stack": {
            "database": env.BENCH_DATABASE,
            "queue": env.BENCH_QUEUE,
            "redis_db": env.BENCH_REDIS_DB,
        },
        "machine": machine.facts(),
    }
    print(
        f"bench: database {env.BENCH_DATABASE}, queue {env.BENCH_QUEUE}, "
        f"Redis db {env.BENCH_REDIS_DB}; {result['machine']['cores']} cores, "
        f"load {result['machine']['load_average_at_start']}"
    )
    app = common.load_app()
    api = common.sign_in(common.InProcessApi(app))
    common.register_mock_agents(api)
    logs = Path(env.bench_log_dir())
    if "floors" in args.scenarios:
        result["floors"] = floors.run(args.floor_iterations)
    if "single" in args.scenarios:
        result["single"] = single.run(
            api, args.single_runs, args.single_delays, args.single_concurrency, logs
        )
    if "drain" in args.scenarios:
        runs = {"linear3": args.drain_runs_linear3, "fan10": args.drain_runs_fan10}
        result["drain"] = drain.run(
            api,
            args.drain_workflows,
            runs,
            args.drain_delays,
            args.drain_concurrency,
            args.drain_timeout,
        )
    if "capacity" in args.scenarios:
        result["capacity"] = capacity.run(
            args.capacity_runs,
            args.capacity_slots,
            args.capacity_delay,
            args.capacity_clients,
            args.capacity_repeats,
            args.capacity_single_runs,
            args.drain_timeout,
            logs,
            dict(item.split("=", 1) for item in args.dev_setting),
            args.capacity_trace,
            args.capacity_paced_delay,
        )
    if "submit" in args.scenarios:
        result["submit"] = submit.run(
            api, args.submit_iterations, args.http_clients, args.http_seconds, logs
        )
    if "coldstart" in args.scenarios:
        result["coldstart"] = coldstart.run(api, args.cold_samples, not args.no_package)
    result["load_average_at_end"] = machine.load_average()
    result["duration_s"] = round(time.time() - started, 1)
    result["headlines"] = report.headlines(result)
    result["cost_model"] = report.cost_model(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = report.markdown(result)
    (args.out / "results.md").write_text(text)
    print()
    print(text.split("## Headlines", 1)[-1].split("\n## ", 1)[0].strip())
    print(f"\nbench: wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
