"""The two database roles (chalicelib/db/roles.py): the migrations, as the owner, make the
application's role and grant it exactly its rights; an unsafe application role is refused."""

from __future__ import annotations

import uuid
from urllib.parse import quote, urlparse, urlunparse

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from chalicelib.config import get_settings
from chalicelib.db import roles
from tests.conftest import OWNER_DATABASE_URL
from tests.integration.conftest import owner_connection

pytestmark = pytest.mark.integration


def url_for(user: str, password: str) -> str:
    parsed = urlparse(OWNER_DATABASE_URL)
    netloc = f"{quote(user)}:{quote(password, safe='')}@{parsed.hostname}:{parsed.port or 5432}"
    return urlunparse(parsed._replace(netloc=netloc))


def test_the_application_role_is_made_with_its_password_and_only_its_rights():
    name = f"maof_roles_{uuid.uuid4().hex[:8]}"
    password = "p'a:ss%word"  # a quote, a colon, a percent sign
    app_url = url_for(name, password)
    with owner_connection() as conn:
        assert roles.apply(conn, app_url, OWNER_DATABASE_URL) == name
        roles.apply(conn, app_url, OWNER_DATABASE_URL)  # again: nothing breaks
    engine = create_engine(app_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM execution_logs")).scalar() >= 0
            with pytest.raises(DBAPIError, match="permission denied"):
                conn.execute(text("UPDATE execution_logs SET status = status"))
            conn.rollback()
            with pytest.raises(DBAPIError, match="permission denied"):
                conn.execute(text("CREATE TABLE sneaky (id int)"))
            conn.rollback()
            with pytest.raises(DBAPIError, match="permission denied"):
                conn.execute(text("DELETE FROM alembic_version"))
    finally:
        engine.dispose()
        with owner_connection() as conn:
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))


def test_a_superuser_is_refused_as_the_application_role():
    owner = urlparse(OWNER_DATABASE_URL).username or "maof"
    app_url = url_for(owner, "whatever")
    other_owner = url_for("someone_else", "x")
    with owner_connection() as conn:
        with pytest.raises(roles.RoleError, match="superuser"):
            roles.apply(conn, app_url, other_owner)


def test_one_url_for_both_means_nothing_to_separate():
    with owner_connection() as conn:
        assert roles.apply(conn, OWNER_DATABASE_URL, OWNER_DATABASE_URL) is None


def test_the_session_connects_as_the_application_role_not_the_owner():
    app_user = urlparse(get_settings().database_url).username
    owner_user = urlparse(get_settings().migration_database_url).username
    assert app_user != owner_user
    from chalicelib.db import session_scope

    with session_scope() as session:
        current = session.execute(text("SELECT current_user")).scalar()
        owner_of_trail = session.execute(
            text("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'execution_logs'")
        ).scalar()
    assert current == app_user and owner_of_trail == owner_user


def test_a_vanished_peer_is_noticed_within_a_minute_on_the_servers_end():
    """Server-side TCP keepalives: a session whose client host died without closing ends
    within a minute (30 s idle, then 3 probes 10 s apart), with the locks it held."""
    from chalicelib.db import session_scope

    with session_scope() as session:
        shown = {
            name: session.execute(text(f"SHOW tcp_keepalives_{name}")).scalar()
            for name in ("idle", "interval", "count")
        }
    assert shown == {"idle": "30", "interval": "10", "count": "3"}


def test_an_application_role_that_is_a_member_of_the_owners_role_is_refused():
    """A member inherits the owner's rights: it could switch the append-only trigger off."""
    owner = urlparse(OWNER_DATABASE_URL).username
    name = f"maof_roles_{uuid.uuid4().hex[:8]}"
    with owner_connection() as conn:
        conn.execute(text(f"CREATE ROLE {name} LOGIN PASSWORD 'pw'"))
        conn.execute(text(f"GRANT {owner} TO {name}"))
    try:
        with owner_connection() as conn:
            with pytest.raises(roles.RoleError, match="member of the owner's role"):
                roles.apply(conn, url_for(name, "pw"), OWNER_DATABASE_URL)
    finally:
        with owner_connection() as conn:
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))


def test_an_existing_application_role_loses_createrole_and_createdb():
    name = f"maof_roles_{uuid.uuid4().hex[:8]}"
    with owner_connection() as conn:
        conn.execute(text(f"CREATE ROLE {name} LOGIN CREATEROLE CREATEDB PASSWORD 'pw'"))
    try:
        with owner_connection() as conn:
            assert roles.apply(conn, url_for(name, "pw"), OWNER_DATABASE_URL) == name
            attributes = conn.execute(
                text("SELECT rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = :n"),
                {"n": name},
            ).one()
        assert tuple(attributes) == (False, False)
    finally:
        with owner_connection() as conn:
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))


def test_the_application_role_cannot_create_in_public_where_public_may():
    """PostgreSQL 14's default (and a database pg_upgraded from it): PUBLIC may CREATE in
    schema public, and the application role with it."""
    name = f"maof_roles_{uuid.uuid4().hex[:8]}"
    app_url = url_for(name, "pw")
    try:
        with owner_connection() as conn:
            conn.execute(text("GRANT CREATE ON SCHEMA public TO PUBLIC"))
            roles.apply(conn, app_url, OWNER_DATABASE_URL)
        engine = create_engine(app_url)
        try:
            with engine.connect() as conn, pytest.raises(DBAPIError, match="permission denied"):
                conn.execute(text("CREATE TABLE sneaky (id int)"))
        finally:
            engine.dispose()
    finally:
        with owner_connection() as conn:
            conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))
