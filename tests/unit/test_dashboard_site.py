"""What the dashboard upload (infra/site.py, for `make deploy` and `make dev`) sends: Content-Types,
the file list, config.json; and where `make dev` says the site opens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chalicelib.config import reset_settings
from devstack.dashboard import SiteUrls, site_urls
from infra.site import content_type, site_config, site_files


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("index.html", "text/html; charset=utf-8"),
        ("app.js", "text/javascript; charset=utf-8"),
        ("app.mjs", "text/javascript; charset=utf-8"),
        ("APP.CSS", "text/css; charset=utf-8"),
        ("config.json", "application/json; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
        ("shot.png", "image/png"),
        ("font.woff2", "font/woff2"),
        ("mystery.unknownext", "application/octet-stream"),
    ],
)
def test_content_types_browsers_accept(name: str, expected: str) -> None:
    assert content_type(Path(name)) == expected


def test_site_files_skip_hidden_files_and_a_checked_in_config(tmp_path: Path) -> None:
    (tmp_path / "js").mkdir()
    for name in ("index.html", "js/main.js", ".DS_Store", "config.json"):
        (tmp_path / name).write_text("x")
    assert sorted(site_files(tmp_path)) == ["index.html", "js/main.js"]


def test_config_names_the_api_without_a_trailing_slash() -> None:
    assert json.loads(site_config("http://127.0.0.1:3000/")) == {"apiUrl": "http://127.0.0.1:3000"}


def test_urls_for_localstack_and_for_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAOF_AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
    reset_settings()
    try:
        urls = site_urls("site")
        assert urls.primary == "http://127.0.0.1:4566/site/index.html"
        assert urls.website == "http://site.s3-website.localhost:4566/"
    finally:
        reset_settings()
    monkeypatch.setenv("MAOF_STAGE", "prod")
    monkeypatch.setenv("MAOF_JWT_SECRET", "x" * 40)
    monkeypatch.setenv("MAOF_SECRET_KEY", "y" * 40)
    monkeypatch.setenv("MAOF_DATABASE_URL", "postgresql://db/maof?sslmode=require")
    monkeypatch.setenv("MAOF_REDIS_URL", "rediss://cache:6379/0")
    monkeypatch.delenv("MAOF_AWS_ENDPOINT_URL")
    for region, website in (
        ("us-east-1", "http://site.s3-website-us-east-1.amazonaws.com/"),
        ("eu-central-1", "http://site.s3-website.eu-central-1.amazonaws.com/"),
    ):
        monkeypatch.setenv("MAOF_AWS_REGION", region)
        reset_settings()
        try:
            assert site_urls("site") == SiteUrls(primary=website, website=website)
        finally:
            reset_settings()
