"""docker-compose.yml, checked by parsing (no Docker engine runs on the development machines)."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import compose_command
from lrsearch.cli import _parser

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DB = {"postgresql+psycopg://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/${POSTGRES_DB}":
      "postgresql+psycopg://u:p@db/lr"}


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


def test_credentials_come_from_the_env_file():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD=" not in text and "POSTGRES_PASSWORD:" not in text
    assert all(service["env_file"] == ".env" for service in SERVICES.values())
    example = (ROOT / ".env.example").read_text()
    assert {"POSTGRES_USER=", "POSTGRES_PASSWORD=", "POSTGRES_DB="} <= {line.split("=")[0] + "=" for line in
                                                                       example.splitlines() if "=" in line}
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_commands_agree_with_the_cli():
    server = compose_command("mlflow", DB)
    args = _parser().parse_args(server[1:])
    assert server[0] == "lrsearch" and args.command.__name__ == "cmd_server"
    assert (args.db, args.artifacts, args.port) == ("postgresql+psycopg://u:p@db/lr", "/artifacts", 5000)

    worker = compose_command("worker", {**DB, "${LRSEARCH_STUDY:-quickstart}": "quickstart"})
    args = _parser().parse_args(worker[1:])
    assert args.command.__name__ == "cmd_worker"
    assert (ROOT / args.file).is_file()
    assert args.tracking_uri == "http://mlflow:5000" and args.storage == "postgresql+psycopg://u:p@db/lr"

    dashboard = compose_command("dashboard", DB)
    assert dashboard[0] == "optuna-dashboard"
    assert dashboard[-1] == "postgresql+psycopg://u:p@db/lr?options=-csearch_path%3Doptuna"


def test_workers_scale():
    worker = SERVICES["worker"]
    assert "ports" not in worker and "container_name" not in worker  # `--scale worker=4` needs both absent
    assert "torch==2.13.0" in (ROOT / "Dockerfile").read_text() and "/whl/cpu" in (ROOT / "Dockerfile").read_text()
