"""Server mode on a fresh PostgreSQL: the database a URL names is created when its role may
(CREATEDB), and otherwise one line names the two commands that set up the role and database."""

from __future__ import annotations

import uuid

import pytest
from conftest import PG_ADMIN_URL, missing

from lrsearch.core.errors import LrsearchError
from lrsearch.store.postgres import SCHEMAS, prepare_database

PASSWORD = "s3cret-do-not-print"


@pytest.fixture
def admin():
    """An AUTOCOMMIT connection as PostgreSQL's superuser, for roles and databases."""
    import sqlalchemy as sa

    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        conn = engine.connect()
    except sa.exc.OperationalError as e:
        missing("PostgreSQL", f"nothing answers at {PG_ADMIN_URL} ({str(e).splitlines()[0]})")
    yield conn
    conn.close()
    engine.dispose()


@pytest.fixture
def role_and_url(admin):
    """Make a role (``CREATEDB`` or not) with a password, and the URL of a database that does
    not exist yet for it; both are dropped afterwards."""
    import sqlalchemy as sa

    made: list[tuple[str, str]] = []

    def make(createdb: bool) -> tuple[str, str, str]:
        suffix = uuid.uuid4().hex[:10]
        role, database = f"lrsearch_role_{suffix}", f"lrsearch_new_{suffix}"
        admin.execute(
            sa.text(f"CREATE ROLE {role} LOGIN {'CREATEDB' if createdb else 'NOCREATEDB'} PASSWORD '{PASSWORD}'")
        )
        made.append((role, database))
        url = sa.engine.make_url(PG_ADMIN_URL).set(username=role, password=PASSWORD, database=database)
        return role, database, url.render_as_string(hide_password=False)

    yield make
    for role, database in made:
        admin.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))


def _owner_and_schemas(admin, database: str) -> tuple[str | None, set[str]]:
    import sqlalchemy as sa

    owner = admin.execute(
        sa.text("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :d"), {"d": database}
    ).scalar()
    if owner is None:
        return None, set()
    engine = sa.create_engine(sa.engine.make_url(PG_ADMIN_URL).set(database=database), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        schemas = set(conn.execute(sa.text("SELECT nspname FROM pg_namespace")).scalars())
    engine.dispose()
    return owner, schemas


def test_a_role_with_createdb_gets_its_missing_database(admin, role_and_url):
    role, database, url = role_and_url(createdb=True)
    assert _owner_and_schemas(admin, database) == (None, set())
    prepare_database(url)
    owner, schemas = _owner_and_schemas(admin, database)
    assert owner == role  # the role's own database: it may create schemas and tables in it
    assert set(SCHEMAS) <= schemas
    prepare_database(url + "?application_name=again")  # now it exists: nothing to create, no error


def test_a_role_without_createdb_is_told_the_two_commands(admin, role_and_url, cli):
    role, database, url = role_and_url(createdb=False)
    with pytest.raises(LrsearchError) as raised:
        prepare_database(url)
    message = str(raised.value)
    assert f'database "{database}" does not exist on ' in message and f'role "{role}" may not create it' in message
    assert f"sudo -u postgres createuser --pwprompt {role}" in message
    assert f"sudo -u postgres createdb --owner {role} {database}" in message
    assert _owner_and_schemas(admin, database) == (None, set())

    # `lrsearch server` stops there, before it starts MLflow: one line, exit 1, no password.
    result = cli("server", "--db", url)
    assert result.returncode == 1, result
    assert result.stderr == f"lrsearch: error: {message}\n"
    assert PASSWORD not in result.stderr + result.stdout


def test_a_missing_role_is_told_the_two_commands(admin):
    import sqlalchemy as sa

    role = f"lrsearch_nobody_{uuid.uuid4().hex[:10]}"
    url = sa.engine.make_url(PG_ADMIN_URL).set(username=role, password=PASSWORD, database="lrsearch_nowhere")
    with pytest.raises(LrsearchError) as raised:
        prepare_database(url.render_as_string(hide_password=False))
    message = str(raised.value)
    assert message.startswith(f'role "{role}" does not exist on ')
    assert f"sudo -u postgres createuser --pwprompt {role}" in message
    assert f"sudo -u postgres createdb --owner {role} lrsearch_nowhere" in message
    assert PASSWORD not in message
