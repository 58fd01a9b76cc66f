"""Publishing the dashboard to S3 (LocalStack) by the AWS CLI: every file with a Content-Type
browsers accept for it, a config.json naming the API, nothing stale left behind, and URLs that
open on this machine."""

from __future__ import annotations

import json
from urllib.parse import urlparse

import requests

from chalicelib.aws import aws_client
from chalicelib.config import get_settings
from devstack.dashboard import site_urls, upload_site
from infra.site import SITE_DIR
from tests.support.site import JAVASCRIPT, site_keys


def test_every_file_is_uploaded_with_its_content_type_and_a_config_naming_the_api(
    bucket_for_site: str,
) -> None:
    bucket = bucket_for_site
    s3 = aws_client("s3")
    s3.put_object(Bucket=bucket, Key="js/removed-long-ago.js", Body=b"//")
    upload_site("http://127.0.0.1:3000/", bucket)

    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {*site_keys(), "config.json"}
    assert {"index.html", "css/app.css", "js/main.js", "js/pages/run.js"} <= keys
    expected = {
        "index.html": {"text/html"},
        "css/app.css": {"text/css"},
        "js/main.js": JAVASCRIPT,
        "js/pages/run.js": JAVASCRIPT,
        "favicon.svg": {"image/svg+xml"},
        "config.json": {"application/json"},
    }
    for key, content_types in expected.items():
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ContentType"] in content_types, key
        assert head["CacheControl"] == "no-cache"
    config = json.loads(s3.get_object(Bucket=bucket, Key="config.json")["Body"].read())
    assert config == {"apiUrl": "http://127.0.0.1:3000"}


def test_the_printed_urls_serve_the_site_from_localstack(bucket_for_site: str) -> None:
    bucket = bucket_for_site
    upload_site("http://127.0.0.1:3000", bucket)
    urls = site_urls(bucket)
    assert urls.primary.endswith(f"/{bucket}/index.html")
    port = urlparse(get_settings().aws_endpoint_url or "").port
    assert urls.website == f"http://{bucket}.s3-website.localhost:{port}/"
    page = requests.get(urls.primary, timeout=5)
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html"
    assert page.content == (SITE_DIR / "index.html").read_bytes()
    config = requests.get(urls.primary.replace("index.html", "config.json"), timeout=5)
    assert config.json() == {"apiUrl": "http://127.0.0.1:3000"}
