"""The local poller's own sizing: it stands in for many Lambda executions in one process."""

import os

from chalicelib.config import get_settings, reset_settings
from devstack.poller import pool_size, shares, size_database_pool


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


def test_executions_are_shared_out_over_the_processes_as_evenly_as_they_go():
    assert shares(16, 2) == [8, 8]
    assert shares(5, 2) == [3, 2]
    assert shares(16, 1) == [16]
    assert shares(2, 4) == [1, 1]  # never a process without an execution


def test_each_process_keeps_connections_for_its_own_executions():
    assert sum(pool_size(None, share) for share in shares(16, 2)) == 32
    assert pool_size("7", 8) == 7
    assert pool_size("", 8) == 16
