"""docker-compose.yml, checked by parsing (no Docker engine runs on the development machines)
and by compose's own substitution rules, applied here as `docker compose` applies them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import compose_interpolate, compose_service

from lrsearch.cli.parser import build_parser

ROOT = Path(__file__).parent.parent
TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(TEXT)
SERVICES = COMPOSE["services"]
ENV = {
    "POSTGRES_USER": "u",
    "POSTGRES_PASSWORD": "p4ss",
    "POSTGRES_DB": "lr",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": "a-long-admin-pw",
}


def _example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_services_and_volumes():
    assert set(SERVICES) == {"postgres", "mlflow", "worker", "dashboard"}
    assert set(COMPOSE["volumes"]) == {"pgdata", "artifacts"}
    assert "pgdata:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert "artifacts:/artifacts" in SERVICES["mlflow"]["volumes"]


def test_healthchecks_gate_the_dependants():
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(SERVICES["mlflow"]["healthcheck"]["test"])
    assert SERVICES["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_ports_are_published_on_loopback_only():
    published = [p for service in SERVICES.values() for p in service.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)


def test_no_secret_in_any_command():
    for name in SERVICES:
        command, environment = compose_service(name, ENV, {}) if "command" in SERVICES[name] else ([], {})
        assert not any(secret in part for part in command for secret in ("p4ss", "a-long-admin-pw")), name
        assert "${" not in " ".join(map(str, SERVICES[name].get("command", []))), name
    assert compose_service("worker", ENV, {})[1]["LRSEARCH_STORAGE"] == "postgresql+psycopg://u:p4ss@postgres:5432/lr"


def test_empty_or_example_passwords_stop_compose_with_a_message():
    example = _example()
    assert example["POSTGRES_PASSWORD"] == "" and example["MLFLOW_TRACKING_PASSWORD"] == ""  # nothing usable
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD is missing a value: set POSTGRES_PASSWORD in .env"):
        compose_interpolate(TEXT, example)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD is missing a value: set MLFLOW_TRACKING_PASSWORD"):
        compose_interpolate(TEXT, {**example, "POSTGRES_PASSWORD": "x"})
    assert "postgres:5432/lr" in compose_interpolate(TEXT, ENV)  # every other variable has a value or default
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_logins_are_on():
    command, environment = compose_service("mlflow", ENV, {})
    assert "--auth" in command
    assert environment["MLFLOW_AUTH_ADMIN_PASSWORD"] == "a-long-admin-pw"
    worker = compose_service("worker", ENV, {})[1]
    assert (worker["MLFLOW_TRACKING_USERNAME"], worker["MLFLOW_TRACKING_PASSWORD"]) == ("admin", "a-long-admin-pw")


def test_commands_agree_with_the_cli():
    server, environment = compose_service("mlflow", ENV, {})
    args = build_parser().parse_args(server[1:])
    assert server[0] == "lrsearch" and args.command.__name__ == "cmd_server"
    assert (args.db, args.artifacts, args.port, args.auth) == (None, "/artifacts", 5000, True)
    assert environment["LRSEARCH_DB"] == "postgresql+psycopg://u:p4ss@postgres:5432/lr"

    worker, environment = compose_service("worker", ENV, {})
    args = build_parser().parse_args(worker[1:])
    assert args.command.__name__ == "cmd_worker"
    assert worker == ["lrsearch", "worker"]  # every submitted study, whatever its name
    assert args.file is None and args.storage is None and args.tracking_uri is None
    assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    dashboard, environment = compose_service("dashboard", ENV, {})
    assert dashboard[0] == "python"
    assert (
        environment["OPTUNA_STORAGE"] == "postgresql+psycopg://u:p4ss@postgres:5432/lr?options=-csearch_path%3Doptuna"
    )


def test_workers_scale():
    worker = SERVICES["worker"]
    assert "ports" not in worker and "container_name" not in worker  # `--scale worker=4` needs both absent
    assert "torch==2.13.0" in (ROOT / "Dockerfile").read_text() and "/whl/cpu" in (ROOT / "Dockerfile").read_text()
