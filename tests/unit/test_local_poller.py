"""The local poller's own sizing: it stands in for many Lambda executions in one process."""

import os

from chalicelib.config import get_settings, reset_settings
from devstack.poller import size_database_pool


def test_the_poller_keeps_two_database_connections_per_execution_unless_told():
    environ: dict[str, str] = {}
    size_database_pool(environ, 16)
    assert environ["MAOF_DB_POOL_SIZE"] == "32"
    environ["MAOF_DB_POOL_SIZE"] = ""  # empty is unset
    size_database_pool(environ, 64)
    assert environ["MAOF_DB_POOL_SIZE"] == "100"  # the setting's ceiling
    environ["MAOF_DB_POOL_SIZE"] = "7"
    size_database_pool(environ, 16)
    assert environ["MAOF_DB_POOL_SIZE"] == "7"


def test_the_sized_pool_is_what_the_settings_read(monkeypatch):
    monkeypatch.delenv("MAOF_DB_POOL_SIZE", raising=False)
    try:
        size_database_pool(os.environ, 4)
        assert get_settings().db_pool_size == 8
    finally:
        monkeypatch.delenv("MAOF_DB_POOL_SIZE", raising=False)
        reset_settings()
