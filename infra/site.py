"""The dashboard on S3, by the AWS CLI: `dashboard/` and a config.json naming the API.
`make deploy` publishes it to the stack's bucket, `make dev` to LocalStack's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

SITE_DIR = Path(__file__).resolve().parents[1] / "dashboard"
# No build step fingerprints the file names: browsers must revalidate every file. Hidden
# files stay here, and a checked-in config.json never replaces the API's.
FILES = ["--exclude", ".*", "--exclude", "*/.*", "--exclude", "config.json"]
NO_CACHE = ["--cache-control", "no-cache"]


def publish_site(
    aws: Callable[..., None], bucket: str, api_url: str, source: Path = SITE_DIR
) -> None:
    """Every file of `source` to `bucket` (Content-Types guessed from the names), objects no
    longer in it removed, and config.json for `api_url`; `aws` runs the CLI."""
    if not (source / "index.html").is_file():
        raise FileNotFoundError(f"{source / 'index.html'} is missing")
    target = f"s3://{bucket}"
    # cp sends every file (sync would skip one changed at the same size with an older date).
    aws("s3", "cp", str(source), target, "--recursive", *FILES, *NO_CACHE)
    aws("s3", "sync", str(source), target, "--delete", *FILES)
    config = json.dumps({"apiUrl": api_url.rstrip("/")}).encode()
    kind = ["--content-type", "application/json"]
    aws("s3", "cp", "-", f"{target}/config.json", *kind, *NO_CACHE, stdin=config)
