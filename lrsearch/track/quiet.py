"""MLflow's chatter kept off the terminal: its loggers' and those of the libraries it runs
(Alembic's migrations, psycopg's pipeline)."""

from __future__ import annotations

import logging


def quiet_mlflow() -> None:
    """Keep MLflow's and Alembic's migration chatter off the terminal, and psycopg's warning
    when MLflow's metric insert on PostgreSQL meets a row it already holds ("error ignored
    terminating <psycopg.Pipeline …>: pipeline aborted"): MLflow catches that IntegrityError
    and inserts the new rows alone, so nothing is lost."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("psycopg").setLevel(logging.ERROR)
