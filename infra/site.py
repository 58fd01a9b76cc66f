"""The dashboard on S3: `dashboard/` with its Content-Types and a config.json naming the API.

`make deploy` publishes it to the stack's bucket, `make dev` to LocalStack's (through
devstack/dashboard.py). Nothing deployed imports this.
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from typing import Any

SITE_DIR = Path(__file__).resolve().parents[1] / "dashboard"
CONFIG_KEY = "config.json"
# Browsers refuse ES modules served with a non-JavaScript type, so don't leave these to guessing.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
}
# No build step fingerprints the file names, so browsers must revalidate every file.
CACHE_CONTROL = "no-cache"


def content_type(path: Path) -> str:
    guessed = CONTENT_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
    return guessed or "application/octet-stream"


def site_files(source: Path = SITE_DIR) -> dict[str, Path]:
    """The files to publish by object key; a checked-in config.json never replaces ours."""
    files = {
        path.relative_to(source).as_posix(): path
        for path in sorted(source.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }
    files.pop(CONFIG_KEY, None)
    return files


def site_config(api_url: str) -> bytes:
    return json.dumps({"apiUrl": api_url.rstrip("/")}, indent=2).encode() + b"\n"


def publish_site(s3: Any, bucket: str, api_url: str, source: Path = SITE_DIR) -> list[str]:
    """Upload the site to `bucket` with a config.json pointing at `api_url`, and remove the
    objects no longer in it; returns the keys written."""
    files = site_files(source)
    if "index.html" not in files:
        raise FileNotFoundError(f"{source / 'index.html'} is missing")
    bodies = {key: (path.read_bytes(), content_type(path)) for key, path in files.items()}
    bodies[CONFIG_KEY] = (site_config(api_url), CONTENT_TYPES[".json"])
    for key, (body, kind) in bodies.items():
        s3.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType=kind, CacheControl=CACHE_CONTROL
        )
    stale = [
        {"Key": item["Key"]}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for item in page.get("Contents", [])
        if item["Key"] not in bodies
    ]
    for start in range(0, len(stale), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": stale[start : start + 1000]})
    return list(bodies)
