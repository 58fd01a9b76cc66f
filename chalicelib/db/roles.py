"""The two database roles: the owner, which runs the migrations and owns every table, and
the application's role, which may only INSERT and SELECT the audit trail (no UPDATE,
DELETE or TRUNCATE; not the owner, so it cannot disable the append-only trigger either).

After every migration run (migrations/env.py), as the owner: the application role is
created when missing (its name and password from MAOF_DATABASE_URL; it needs CREATEROLE,
which a local superuser and an RDS master user have), kept unprivileged, and given exactly
its rights. When both URLs name one role, there is nothing to separate and nothing is done.
A role belongs to the whole server: each database (stage) on one server needs a role name
of its own, since migrating one sets the role's password (docs/deploy.md).
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

# Tables the application may only add to and read: history is never rewritten.
APPEND_ONLY_TABLES = ("execution_logs", "audit_checkpoints", "audit_checkpoint_runs")
READ_ONLY_TABLES = ("alembic_version",)


class RoleError(Exception):
    """The application role is unsafe or cannot be set up; the message says why."""


def role_of(url: str) -> tuple[str, str | None]:
    parsed = urlparse(url.replace("+psycopg", ""))
    if not parsed.username:
        raise RoleError("the database URL names no user")
    password = unquote(parsed.password) if parsed.password is not None else None
    return unquote(parsed.username), password


def separate_roles(app_url: str, migration_url: str) -> bool:
    return role_of(app_url)[0] != role_of(migration_url)[0]


def ensure_app_role(conn: Connection, app_url: str) -> str:
    """Create (or update the password of) the application's login role; refuse one that
    could bypass the grants (superuser, BYPASSRLS), that is a member of the owner's role
    (and so has, or can SET ROLE to, the owner's rights) or that owns the audit trail; an
    existing one loses CREATEROLE and CREATEDB."""
    name, password = role_of(app_url)
    quoted = conn.dialect.identifier_preparer.quote(name)
    row = conn.execute(
        text(
            "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, "
            "pg_has_role(oid, current_user, 'MEMBER') AS owners_member "
            "FROM pg_roles WHERE rolname = :name"
        ),
        {"name": name},
    ).first()
    if row is not None and (row.rolsuper or row.rolbypassrls):
        raise RoleError(
            f"the application role {name} is a superuser (or bypasses row security): it could "
            "rewrite the audit trail; give MAOF_DATABASE_URL an unprivileged role"
        )
    if row is not None and row.owners_member:
        raise RoleError(
            f"the application role {name} is a member of the owner's role: it has the "
            "owner's rights and could disable the audit trail's append-only trigger; "
            f"REVOKE the owner's role FROM {name}, or give MAOF_DATABASE_URL another role"
        )
    if row is None:
        _cluster_wide(
            conn,
            f"CREATE ROLE {quoted} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE",
            ("42710", "23505"),  # exists: made meanwhile (seen then, or at its commit)
        )
    elif row.rolcreaterole or row.rolcreatedb:
        # CREATEROLE could grant it the owner's role (or make roles that have it).
        _cluster_wide(conn, f"ALTER ROLE {quoted} NOCREATEROLE NOCREATEDB", ("XX000",), True)
    if password is not None:
        # ALTER ROLE takes no bind parameters: the literal is quoted by SQL's rule.
        literal = password.replace("'", "''")
        _cluster_wide(
            conn, f"ALTER ROLE {quoted} WITH LOGIN PASSWORD '{literal}'", ("XX000",), retry=True
        )
    owner = conn.execute(
        text("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass(:t)"),
        {"t": "public.execution_logs"},
    ).scalar()
    if owner == name:
        raise RoleError(f"the application role {name} owns execution_logs")
    return name


def _cluster_wide(
    conn: Connection, statement: str, benign: tuple[str, ...], retry: bool = False
) -> None:
    """Roles belong to the whole cluster: another database's migration (a parallel test
    session, say) may create or alter the same role at the same moment. A savepoint keeps
    that race (SQLSTATE `benign`: it exists already, or was updated concurrently) from
    aborting the migration; an alteration (`retry`) is tried again."""
    # A password may hold ':' (a bind marker to text()): escaped.
    statement = statement.replace(":", "\\:")
    for attempt in range(3):
        savepoint = conn.begin_nested()
        try:
            conn.execute(text(statement))
        except DBAPIError as exc:
            savepoint.rollback()
            if getattr(exc.orig, "sqlstate", None) not in benign:
                raise
            if not retry or attempt == 2:
                return
            continue
        savepoint.commit()
        return


def grant_app_rights(conn: Connection, role: str) -> None:
    """Everything the application needs on every table; SELECT and INSERT only on the
    append-only ones; SELECT only on alembic_version."""
    quoted = conn.dialect.identifier_preparer.quote(role)
    database = conn.dialect.identifier_preparer.quote(
        str(conn.execute(text("SELECT current_database()")).scalar())
    )
    statements = [
        f"GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {quoted}",
        f"GRANT USAGE ON SCHEMA public TO {quoted}",
        f"REVOKE CREATE ON SCHEMA public FROM {quoted}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {quoted}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted}",
    ]
    existing = set(
        conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
    )
    for table in APPEND_ONLY_TABLES:
        if table in existing:
            statements += [
                f"REVOKE ALL ON {table} FROM {quoted}",
                f"GRANT SELECT, INSERT ON {table} TO {quoted}",
            ]
    for table in READ_ONLY_TABLES:
        if table in existing:
            statements += [
                f"REVOKE ALL ON {table} FROM {quoted}",
                f"GRANT SELECT ON {table} TO {quoted}",
            ]
    for statement in statements:
        conn.execute(text(statement))
    _no_create_for_public(conn)


def _no_create_for_public(conn: Connection) -> None:
    """PUBLIC (every role, the application's too) may not create in schema public: before
    PostgreSQL 15 it could by default, and a database pg_upgraded from 14 keeps that grant.
    Revoked when the owner owns the schema; otherwise the schema's owner must revoke it."""
    owns, public_creates = conn.execute(
        text(
            "SELECT pg_has_role(current_user, nspowner, 'MEMBER'), "
            "has_schema_privilege('public', oid, 'CREATE') "
            "FROM pg_namespace WHERE nspname = 'public'"
        )
    ).one()
    if owns:
        conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
    elif public_creates:
        raise RoleError(
            "PUBLIC may create in schema public (PostgreSQL 14's default), so the "
            "application role could too, and the owner does not own the schema: run "
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC as its owner"
        )


def apply(conn: Connection, app_url: str, migration_url: str) -> str | None:
    """Set up the application role after the migrations; None when there is only one role."""
    if not separate_roles(app_url, migration_url):
        return None
    role = ensure_app_role(conn, app_url)
    grant_app_rights(conn, role)
    return role
