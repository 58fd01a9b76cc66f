"""The dashboard on LocalStack's S3 for `make dev`: the upload itself is infra/site.py's (the one
`make deploy` uses, by the AWS CLI); `site_urls` says where a browser on this machine can open it.

The bucket's website hosting is configured by `stack.ensure_resources`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

from chalicelib.config import get_settings
from infra import aws
from infra.site import SITE_DIR, publish_site

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


def upload_site(api_url: str, bucket: str | None = None, source: Path = SITE_DIR) -> None:
    """Publish the dashboard for `api_url` to `bucket` (default: the configured dashboard
    bucket) on LocalStack or AWS, per the settings."""
    settings = get_settings()
    cli = partial(aws, region=settings.aws_region, endpoint=settings.aws_endpoint_url)
    publish_site(cli, bucket or settings.dashboard_bucket, api_url, source)


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
