"""The facts a result needs to be read against: hardware, software, services, load."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain")),
    }


def _versions() -> dict[str, str]:
    found = {}
    for name in ("chalice", "boto3", "botocore", "SQLAlchemy", "psycopg", "redis", "pydantic"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _postgres() -> str:
    from sqlalchemy import text

    from chalicelib.db import get_engine

    with get_engine().connect() as conn:
        return str(conn.execute(text("SHOW server_version")).scalar())


def _redis() -> str:
    from chalicelib.cache import get_redis

    info: Any = get_redis().info("server")
    return str(info.get("redis_version"))


def _localstack() -> str:
    from chalicelib.config import get_settings

    endpoint = get_settings().aws_endpoint_url or "http://127.0.0.1:4566"
    for path in ("/_localstack/info", "/_localstack/health"):
        try:
            with urllib.request.urlopen(endpoint + path, timeout=2) as response:  # noqa: S310
                version = json.load(response).get("version")
                if version:
                    return str(version)
        except (OSError, ValueError):
            continue
    return "unknown"


def facts() -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "postgres": _postgres(),
        "redis": _redis(),
        "localstack": _localstack(),
        "libraries": _versions(),
        "git": _git(),
        "load_average_at_start": load_average(),
    }
