"""What the dashboard upload (infra/site.py, for `make deploy` and `make dev`) asks the AWS CLI
to do: every file but hidden ones and a checked-in config.json, stale objects removed, a
config.json naming the API; and where `make dev` says the site opens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chalicelib.config import reset_settings
from devstack.dashboard import SiteUrls, site_urls
from infra.site import publish_site


def recorded(source: Path, api_url: str) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    calls: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    publish_site(lambda *args, **options: calls.append((args, options)), "site", api_url, source)
    return calls


def test_every_file_then_the_stale_ones_then_the_config(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    [(copy, _), (sync, _), (config, options)] = recorded(tmp_path, "http://127.0.0.1:3000/")
    assert copy[:5] == ("s3", "cp", str(tmp_path), "s3://site", "--recursive")
    assert sync[:5] == ("s3", "sync", str(tmp_path), "s3://site", "--delete")
    for args in (copy, sync):  # hidden files and a checked-in config.json stay here
        excluded = {args[i + 1] for i, arg in enumerate(args) if arg == "--exclude"}
        assert excluded == {".*", "*/.*", "config.json"}
    assert copy[-2:] == config[-2:] == ("--cache-control", "no-cache")
    assert config[:4] == ("s3", "cp", "-", "s3://site/config.json")
    assert "application/json" in config
    assert json.loads(options["stdin"]) == {"apiUrl": "http://127.0.0.1:3000"}


def test_a_site_without_index_html_is_refused(tmp_path: Path) -> None:
    (tmp_path / "app.js").write_text("//")
    with pytest.raises(FileNotFoundError, match=r"index\.html"):
        recorded(tmp_path, "http://127.0.0.1:3000")


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
