"""The command line's grammar: every command, its options and their types (each option's rule
is a constraint object of core/constraints.py, as in the study files)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lrsearch.cli import commands, result_commands

if TYPE_CHECKING:
    from lrsearch.core.constraints import Constraint


def _option(kind: type, constraint: Constraint) -> Callable[[str], Any]:
    """An argparse type: ``text`` read as ``kind`` and accepted if ``constraint(value)`` (an
    object of ``core/constraints.py``); else one message, ``expected …, got …``, whatever was
    wrong with it."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not constraint(value):
            raise argparse.ArgumentTypeError(f"expected {constraint.expected}, got {text!r}")
        return value

    return parse


def _positive_int(text: str) -> int:
    from lrsearch.core.constraints import Interval

    return _option(int, Interval(int, 1, None))(text)


def _factor(text: str) -> float:
    from lrsearch.choices.space import FIND_FACTOR

    return _option(float, FIND_FACTOR)(text)


def _positive_float(text: str) -> float:
    import math

    from lrsearch.core.constraints import Satisfies

    return _option(float, Satisfies("a number of seconds > 0", lambda v: 0 < v < math.inf))(text)


def _array(text: str) -> int | str:
    from lrsearch.config import ARRAY

    return text if text == "auto" else _option(int, ARRAY)(text)


def _accelerator(text: str) -> str:
    from lrsearch.choices.accelerators import ACCELERATORS
    from lrsearch.core.constraints import Options

    return _option(str, Options(ACCELERATORS.names))(text)


def build_parser() -> argparse.ArgumentParser:
    from lrsearch.core.names import DEFAULT_UI_PORT

    parser = argparse.ArgumentParser(
        prog="lrsearch",
        description="Search learning rate, momentum, schedule and optimizer with Optuna; "
        "train with Lightning; track in MLflow.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def stores(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--storage",
            metavar="URL",
            help="Optuna storage URL (default: $LRSEARCH_STORAGE or ./lrsearch-data/optuna.db)",
        )
        p.add_argument(
            "--tracking-uri",
            metavar="URI",
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./lrsearch-data/mlflow.db)",
        )

    def array_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--array",
            type=_array,
            metavar="K",
            help='trials trained at once, in one fit: "auto" (timed here) or K '
            '(default: the study\'s [train] array, itself "auto" by default)',
        )

    def accelerator_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--accelerator",
            type=_accelerator,
            metavar="NAME",
            help="Lightning's accelerator: auto (a GPU where torch sees one, else the CPU), cpu or gpu "
            "(default: the study's [train] accelerator, itself auto by default)",
        )

    def study_options(p: argparse.ArgumentParser, file_required: bool = True) -> None:
        p.add_argument("file", nargs=None if file_required else "?", help="study file, e.g. studies/quickstart.toml")
        p.add_argument("--trials", type=_positive_int, metavar="N", help="the study's total number of trials")
        p.add_argument("--epochs", type=_positive_int, metavar="N", help="epochs per trial")
        p.add_argument("--name", metavar="NAME", help="study name (default: [study].name)")
        stores(p)

    p = sub.add_parser("run", help="run (or resume) a study from a TOML study file")
    study_options(p)
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes on this host (default 1: trials run in this process)",
    )
    array_option(p)
    accelerator_option(p)
    p.add_argument(
        "--no-report", action="store_true", help="skip the end-of-study report (lrsearch report NAME draws it later)"
    )
    p.set_defaults(command=commands.cmd_run, worker_index=0)

    p = sub.add_parser("submit", help="queue a study for the workers (creates or resumes it) and return")
    study_options(p)
    p.set_defaults(command=commands.cmd_submit)

    p = sub.add_parser("worker", help="serve every submitted study (or, with FILE, that one study) from any host")
    study_options(p, file_required=False)
    p.add_argument(
        "--max-idle",
        type=_positive_float,
        metavar="S",
        help="without FILE: exit after S seconds with nothing to do (default: serve until stopped)",
    )
    p.add_argument(
        "--worker-index",
        type=int,
        default=None,
        metavar="I",
        help="this worker's index, for its sampler seed (default: from the host and process id)",
    )
    array_option(p)
    accelerator_option(p)
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print warnings and errors only (not the studies it takes up and leaves, nor their summary)",
    )
    p.set_defaults(command=commands.cmd_worker)

    p = sub.add_parser("status", help="the submitted studies: state, progress, best value, workers, time left")
    p.add_argument("name", nargs="?", help="one study (default: all)")
    p.add_argument("--watch", action="store_true", help="refresh until every study shown is done or cancelled")
    p.add_argument("--interval", type=_positive_float, default=2.0, metavar="S", help="with --watch (default 2)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    stores(p)
    p.set_defaults(command=commands.cmd_status)

    p = sub.add_parser("cancel", help="stop a study: no new trials (submit it again to resume)")
    p.add_argument("name", help="study name")
    p.add_argument(
        "--now", action="store_true", help="also stop its running trials at their next epoch (FAIL, reason 'cancelled')"
    )
    stores(p)
    p.set_defaults(command=commands.cmd_cancel)

    p = sub.add_parser("server", help="the MLflow tracking server on a PostgreSQL (or SQLite) database")
    p.add_argument(
        "--db",
        metavar="URL",
        help="postgresql+psycopg://user@host/db (default: $LRSEARCH_DB, which keeps a password off the command line)",
    )
    p.add_argument(
        "--auth",
        action="store_true",
        help="require a login (MLflow's basic-auth app; admin from $MLFLOW_AUTH_ADMIN_USERNAME and "
        "$MLFLOW_AUTH_ADMIN_PASSWORD)",
    )
    p.add_argument(
        "--artifacts", metavar="DIR", help="where the server stores artifacts (default: ./lrsearch-data/artifacts)"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=_positive_int, default=5000)
    p.add_argument(
        "--allowed-hosts",
        metavar="HOSTS",
        help="Host headers MLflow accepts when bound beyond loopback, e.g. mlflow:5000",
    )
    p.add_argument(
        "--workers", type=_positive_int, default=1, help="uvicorn worker processes (default 1: see docs/performance.md)"
    )
    p.set_defaults(command=commands.cmd_server)

    p = sub.add_parser("best", help="show a study's best trials")
    p.add_argument("name", help="study name")
    p.add_argument("--top", type=_positive_int, default=10, metavar="N", help="the N best trials (default: 10)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument(
        "--register",
        action="store_true",
        help="first register the best trial's network in MLflow's Model Registry (as models:/NAME@best) "
        "unless it already is",
    )
    stores(p)
    p.set_defaults(command=result_commands.cmd_best)

    p = sub.add_parser("report", help="draw a study's figures and HTML report from the stores")
    p.add_argument("name", help="study name")
    p.add_argument("--out", metavar="DIR", help="folder for the files (default: ./lrsearch-data/reports/NAME)")
    p.add_argument(
        "--table",
        action="store_true",
        help="print the Markdown results table (final val acc, first epoch >= 0.80) instead",
    )
    stores(p)
    p.set_defaults(command=result_commands.cmd_report)

    p = sub.add_parser("sql", help="run a read-only SQL query over the results views")
    p.add_argument("query", nargs="?", help='e.g. "SELECT * FROM best_trials WHERE rank <= 3"')
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--schema", action="store_true", help="print the SQL that creates the views and exit")
    p.add_argument(
        "--timeout", type=_positive_float, default=30.0, metavar="S", help="stop the query after S seconds (default 30)"
    )
    p.add_argument(
        "--grant-reader",
        metavar="ROLE",
        help="PostgreSQL: create ROLE, which may only read the results (password from "
        "$LRSEARCH_READER_PASSWORD), and exit; needs a superuser's --storage",
    )
    stores(p)
    p.set_defaults(command=result_commands.cmd_sql)

    p = sub.add_parser("validate", help="check a study file and exit (2 on a mistake)")
    p.add_argument("file")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="where a study with lr = { find = true } may have its range "
        "(default: $LRSEARCH_STORAGE or ./lrsearch-data/optuna.db)",
    )
    p.set_defaults(command=commands.cmd_validate)

    p = sub.add_parser("lr-find", help="the learning-rate range test on a study's data and model")
    p.add_argument("file", help="study file, e.g. studies/quickstart.toml")
    p.add_argument("--optimizer", metavar="NAME", help="default: the study's (its first choice when searched)")
    p.add_argument(
        "--factor",
        type=_factor,
        metavar="F",
        help="the search range: suggestion / F to suggestion × F (default: lr's factor, else 10)",
    )
    accelerator_option(p)
    p.add_argument("--format", choices=("table", "json"), default="table")
    stores(p)
    p.set_defaults(command=commands.cmd_lr_find)

    p = sub.add_parser("ui", help="serve the MLflow UI on the embedded store")
    p.add_argument("--port", type=_positive_int, default=DEFAULT_UI_PORT)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--tracking-uri", metavar="URI", help="tracking store (default: the embedded one)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show the MLflow server's own log: its INFO lines and one line per request",
    )
    p.set_defaults(command=result_commands.cmd_ui)
    return parser
