"""`lrsearch sql` as an attacker would use it, on a real PostgreSQL (as a superuser and as the
reader role) and on the embedded SQLite files: every attack fails and changes nothing."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import fill_results, free_port, missing
from mlflow import MlflowClient

from lrsearch.core.errors import UsageError
from lrsearch.sql.queries import ResultsDatabase
from lrsearch.sql.readers import grant_reader
from lrsearch.sql.schema import ensure_views
from lrsearch.store.postgres import prepare_database
from lrsearch.store.urls import schema_url

MARKER = f"/tmp/lrsearch-attack-{uuid.uuid4().hex}"


def _id(attack: str) -> str:
    """The attack's text with the per-run marker path elided: the same test ids in every process."""
    return attack.replace(MARKER, "/tmp/lrsearch-attack-MARKER")


ATTACKS = [
    "SET TRANSACTION READ WRITE; DELETE FROM optuna.trial_values; COMMIT",  # several statements
    "DELETE FROM optuna.trial_values",
    "UPDATE optuna.studies SET study_name = 'x'",
    "DO $$ BEGIN SET TRANSACTION READ WRITE; DELETE FROM optuna.trial_values; END $$",
    "CREATE ROLE lrsearch_evil SUPERUSER LOGIN",
    "ALTER ROLE CURRENT_USER SUPERUSER",
    f"COPY (SELECT 1) TO PROGRAM 'touch {MARKER}-program'",
    f"COPY (SELECT 'x') TO '{MARKER}-file'",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
    "SET ROLE postgres",
    "CREATE TEMP TABLE t AS SELECT 1",
    "SELECT * FROM optuna.trials FOR UPDATE",
    "SELECT nextval('optuna.studies_study_id_seq')",
    "GRANT pg_execute_server_program TO CURRENT_USER",
]
SLOW = ["SELECT pg_sleep(30)", "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"]


@pytest.fixture(scope="module")
def results_pg(pg_url):
    """The module's database with Optuna's and MLflow's tables, a results scenario and the views."""
    prepare_database(pg_url)
    fill_results(pg_url, MlflowClient(tracking_uri=schema_url(pg_url, "mlflow")))
    assert ensure_views(pg_url)
    return pg_url


@pytest.fixture(scope="module")
def reader_url(results_pg):
    role = f"lrsearch_reader_{uuid.uuid4().hex[:8]}"
    url = grant_reader(results_pg, role)
    yield url.replace("***", "")  # trust auth: no password
    engine = sa.create_engine(results_pg, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sa.text(f"DROP OWNED BY {role}"))
        conn.execute(sa.text(f"DROP ROLE {role}"))
    engine.dispose()


def _snapshot(url: str) -> tuple:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        values = conn.execute(sa.text("SELECT count(*), sum(value) FROM optuna.trial_values")).one()
        names = conn.execute(sa.text("SELECT array_agg(study_name ORDER BY study_name) FROM optuna.studies")).scalar()
        roles = conn.execute(
            sa.text("SELECT array_agg(rolname::text ORDER BY rolname) FROM pg_roles WHERE rolsuper")
        ).scalar()
    engine.dispose()
    return tuple(values), tuple(names), tuple(roles)


def test_a_superusers_url_is_refused_before_any_statement_runs(results_pg):
    before = _snapshot(results_pg)
    for attack in ATTACKS + SLOW:
        with pytest.raises(UsageError) as info:
            with ResultsDatabase(results_pg, user_sql=True, timeout=1) as db:
                db.query(attack)
        message = str(info.value)
        assert message.startswith("lrsearch sql runs queries only as a read-only role, and 'postgres' can write")
        assert "--grant-reader lrsearch_reader" in message and "\n" not in message
    assert _snapshot(results_pg) == before
    assert not list(Path("/tmp").glob(Path(MARKER).name + "*"))


@pytest.mark.parametrize("attack", ATTACKS, ids=_id)
def test_every_attack_fails_as_the_reader_and_changes_nothing(results_pg, reader_url, attack):
    before = _snapshot(results_pg)
    with ResultsDatabase(reader_url, user_sql=True, timeout=5) as db:
        with pytest.raises(UsageError, match=r"^lrsearch sql runs (read-only queries|one statement per call): "):
            db.query(attack)
    assert _snapshot(results_pg) == before
    assert not list(Path("/tmp").glob(Path(MARKER).name + "*"))


@pytest.mark.parametrize("attack", SLOW)
def test_a_slow_query_stops_at_the_timeout(results_pg, reader_url, attack):
    started = time.monotonic()
    with ResultsDatabase(reader_url, user_sql=True, timeout=1) as db:
        with pytest.raises(UsageError, match=r"^query stopped after 1 s \(statement timeout; --timeout S"):
            db.query(attack)
    assert time.monotonic() - started < 10


def test_the_reader_reads_the_views_and_the_readme_queries(results_pg, reader_url):
    from lrsearch.sql.schema import _statements

    with ResultsDatabase(reader_url, user_sql=True) as db:
        assert db.query("SELECT count(*) FROM trials").rows == [(12,)]
        best = db.query("SELECT study_name, trial_number FROM best_trials WHERE rank = 1 ORDER BY study_name")
        assert best.rows == [("acc", 0), ("loss", 1)]
    page = (Path(__file__).parent.parent / "docs" / "sql.md").read_text()
    statements = _statements(page.split("```sql\n", 1)[1].split("```", 1)[0])
    assert len(statements) >= 5
    for statement in statements:
        with ResultsDatabase(reader_url, user_sql=True) as db:
            db.query(statement.replace("'quickstart'", "'acc'"))  # raises on a refused table or bad SQL


def test_the_reader_keeps_its_grants_when_the_views_are_replaced(results_pg, reader_url):
    engine = sa.create_engine(results_pg, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:  # as after an upgrade: the stored version no longer matches
        conn.execute(sa.text("COMMENT ON VIEW lrsearch.trials IS 'lrsearch views old'"))
    engine.dispose()
    assert ensure_views(results_pg)
    with ResultsDatabase(reader_url, user_sql=True) as db:
        assert db.query("SELECT count(*) FROM studies").rows == [(3,)]


def test_grant_reader_refuses_a_privileged_role_and_a_bad_name(results_pg):
    with pytest.raises(UsageError, match="role 'postgres' exists and can do more than read"):
        grant_reader(results_pg, "postgres")
    with pytest.raises(UsageError, match="expected a role name of lowercase letters"):
        grant_reader(results_pg, 'x"; DROP TABLE optuna.trials; --')


READER_PASSWORD = "r3ader-s3cret-pw"


@pytest.fixture(scope="module")
def scram_server():
    """A private PostgreSQL (its socket folder and port) that asks every TCP login for its
    password by SCRAM: the shared one trusts every login, so any password would do there."""
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if initdb is None:
        missing("initdb", "a private PostgreSQL checks the reader's password: install PostgreSQL's server")
    bindir = Path(initdb).parent
    folder = Path(tempfile.mkdtemp(prefix="lrsearch-scram-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_owner = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    pg_ctl = [*as_owner, str(bindir / "pg_ctl"), "-D", str(data)]
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run(
        [*as_owner, initdb, "-D", str(data), "-U", "postgres", "-N", "--auth-local=trust", "--auth-host=scram-sha-256"],
        **run,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*pg_ctl, "-l", str(folder / "log"), "-w", "-o", options, "start"], **run)
    yield folder, port
    subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=120)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_the_reader_logs_in_with_its_password_and_no_other(results_pg, scram_server, monkeypatch):
    import psycopg
    from psycopg import sql

    role = f"lrsearch_reader_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("LRSEARCH_READER_PASSWORD", READER_PASSWORD)
    url = grant_reader(results_pg, role)
    engine = sa.create_engine(results_pg, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        verifier = conn.execute(
            sa.text("SELECT rolpassword FROM pg_authid WHERE rolname = :role"), {"role": role}
        ).scalar()
        conn.execute(sa.text(f"DROP OWNED BY {role}"))
        conn.execute(sa.text(f"DROP ROLE {role}"))
    engine.dispose()
    assert READER_PASSWORD not in url and verifier.startswith("SCRAM-SHA-256$") and READER_PASSWORD not in verifier
    # The verifier grant_reader stored, on a server that checks it: the password logs in, another does not.
    folder, port = scram_server
    with psycopg.connect(host=str(folder), port=port, user="postgres", dbname="postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier)))
    login = {"host": "127.0.0.1", "port": port, "user": role, "dbname": "postgres", "connect_timeout": 10}
    with psycopg.connect(**login, password=READER_PASSWORD) as conn:
        assert conn.pgconn.used_password and conn.execute("SELECT current_user").fetchone() == (role,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**login, password="not-" + READER_PASSWORD)


def test_the_cli_refuses_in_one_line_with_exit_2(results_pg, reader_url, tmp_path):
    def sql(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lrsearch.cli", "sql", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**os.environ, "LRSEARCH_STORAGE": ""},
        )

    for url in (results_pg, reader_url):
        result = sql(ATTACKS[0], "--storage", url)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    result = sql("SELECT pg_sleep(30)", "--timeout", "1", "--storage", reader_url)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "lrsearch: error: query stopped after 1 s (statement timeout; --timeout S to allow longer)"
    )
    ok = sql("SELECT study_name FROM studies ORDER BY 1", "--format", "csv", "--storage", reader_url)
    assert ok.returncode == 0 and ok.stdout.split() == ["study_name", "acc", "loss", "multi"]


# -- the embedded files ----------------------------------------------------------------------

SQLITE_ATTACKS = [
    "DELETE FROM optuna.trial_values",
    "SELECT 1; DELETE FROM optuna.trial_values",
    "UPDATE optuna.studies SET study_name = 'x'",
    "INSERT INTO optuna.studies (study_name) VALUES ('x')",
    "REPLACE INTO optuna.studies (study_id, study_name) VALUES (1, 'x')",
    "CREATE TABLE optuna.evil (a INTEGER)",
    "DROP VIEW best_trials",
    "CREATE TEMP TRIGGER t AFTER INSERT ON optuna.studies BEGIN SELECT 1; END",
    f"ATTACH DATABASE '{MARKER}.db' AS evil",
    "DETACH DATABASE optuna",
    "PRAGMA optuna.journal_mode = DELETE",
    "PRAGMA writable_schema = 1",
    f"VACUUM optuna INTO '{MARKER}.db'",
    "SELECT load_extension('/tmp/evil')",
]


@pytest.fixture(scope="module")
def results_sqlite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sqlite-attacks")
    storage, tracking = f"sqlite:///{folder}/optuna.db", f"sqlite:///{folder}/mlflow.db"
    fill_results(storage, MlflowClient(tracking_uri=tracking))
    return folder, storage, tracking


def _digests(folder: Path) -> dict[str, str]:
    """Every file's digest but the WAL index (-shm), shared memory that readers write to."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if not p.name.endswith("-shm")
    }


@pytest.mark.parametrize("attack", SQLITE_ATTACKS, ids=_id)
def test_every_attack_fails_on_the_embedded_files(results_sqlite, attack):
    folder, storage, tracking = results_sqlite
    before = _digests(folder)
    with ResultsDatabase(storage, tracking, user_sql=True) as db:
        with pytest.raises(UsageError, match=r"^lrsearch sql runs (read-only queries|one statement per call): "):
            db.query(attack)
    assert _digests(folder) == before
    assert not Path(f"{MARKER}.db").exists()


def test_a_runaway_recursive_query_stops_on_sqlite(results_sqlite):
    _, storage, tracking = results_sqlite
    started = time.monotonic()
    with ResultsDatabase(storage, tracking, user_sql=True, timeout=1) as db:
        with pytest.raises(UsageError, match=r"^query stopped after 1 s"):
            db.query(SLOW[1])
    assert time.monotonic() - started < 10
