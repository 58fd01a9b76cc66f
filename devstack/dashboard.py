"""The dashboard on S3: upload `dashboard/` with its Content-Types and a config.json naming the API.

Locally the bucket is LocalStack's (website hosting configured by `stack.ensure_resources`);
`site_urls` says where a browser on this machine can open it.
"""

from __future__ import annotations

import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from chalicelib.aws import aws_client
from chalicelib.config import get_settings
from devstack.stack import PROJECT_DIR

SITE_DIR = PROJECT_DIR / "dashboard"
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
# Regions whose website endpoint is `s3-website-<region>`; newer ones use `s3-website.<region>`.
_DASH_WEBSITE_REGIONS = {
    "us-east-1",
    "us-west-1",
    "us-west-2",
    "eu-west-1",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-northeast-1",
    "sa-east-1",
    "us-gov-west-1",
}


@dataclass(frozen=True)
class SiteUrls:
    """Where the uploaded site opens: `primary` in any browser here, `website` on the S3
    website endpoint (index and error documents served by S3)."""

    primary: str
    website: str


def content_type(path: Path) -> str:
    known = CONTENT_TYPES.get(path.suffix.lower())
    if known:
        return known
    guessed, _ = mimetypes.guess_type(path.name)
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


def upload_site(
    api_url: str, bucket: str | None = None, source: Path = SITE_DIR, s3: Any = None
) -> list[str]:
    """Publish the dashboard to `bucket` (default: the configured dashboard bucket) with a
    config.json pointing at `api_url`; objects no longer in the site are removed. `s3` is
    the client to use (default: LocalStack's or AWS's, per the settings; `make deploy`
    passes its own).

    Returns the keys written.
    """
    bucket = bucket or get_settings().dashboard_bucket
    files = site_files(source)
    if "index.html" not in files:
        raise FileNotFoundError(f"{source / 'index.html'} is missing")
    s3 = s3 or aws_client("s3")
    for key, path in files.items():
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=path.read_bytes(),
            ContentType=content_type(path),
            CacheControl=CACHE_CONTROL,
        )
    s3.put_object(
        Bucket=bucket,
        Key=CONFIG_KEY,
        Body=site_config(api_url),
        ContentType=CONTENT_TYPES[".json"],
        CacheControl=CACHE_CONTROL,
    )
    written = [*files, CONFIG_KEY]
    _remove_stale(s3, bucket, set(written))
    return written


def _remove_stale(s3: Any, bucket: str, keep: set[str]) -> None:
    stale: list[dict[str, str]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        stale += [{"Key": item["Key"]} for item in page.get("Contents", [])]
    stale = [item for item in stale if item["Key"] not in keep]
    for start in range(0, len(stale), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": stale[start : start + 1000]})


def site_urls(bucket: str | None = None) -> SiteUrls:
    """URLs of the uploaded site that open in a browser on this machine.

    LocalStack's own website host name (`<bucket>.s3-website.localhost.localstack.cloud`)
    needs public DNS. Its gateway also recognises `<bucket>.s3-website.localhost`, which
    browsers resolve to the loopback address themselves (RFC 6761), and serves every
    object path-style with its stored Content-Type, which needs no name resolution at all.
    """
    settings = get_settings()
    bucket = bucket or settings.dashboard_bucket
    endpoint = settings.aws_endpoint_url
    if endpoint:
        parsed = urlparse(endpoint)
        host = parsed.hostname or "127.0.0.1"
        port = f":{parsed.port}" if parsed.port else ""
        website_host = "localhost" if host in ("127.0.0.1", "localhost", "::1") else host
        return SiteUrls(
            primary=f"{parsed.scheme}://{parsed.netloc}/{bucket}/index.html",
            website=f"{parsed.scheme}://{bucket}.s3-website.{website_host}{port}/",
        )
    region = settings.aws_region
    separator = "-" if region in _DASH_WEBSITE_REGIONS else "."
    website = f"http://{bucket}.s3-website{separator}{region}.amazonaws.com/"
    return SiteUrls(primary=website, website=website)


def publish(api_url: str) -> SiteUrls:
    """What `make dev` does: upload the site for `api_url` and say where it opens."""
    upload_site(api_url)
    return site_urls()
