"""The commands that read a study's results: its best trials (and their model registered), its
report, SQL on its views, and the MLflow UI. Like ``commands.py``'s, each calls the library and
prints, with heavy modules imported inside.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrsearch.cli.commands import EXIT_OK, _quiet
from lrsearch.cli.output import TRIAL_COLUMNS, format_rows, model_line
from lrsearch.core.errors import UsageError
from lrsearch.core.text import count


def cmd_best(args: argparse.Namespace) -> int:
    from lrsearch.sql.queries import best_trials_sql

    if args.register:  # the best trial's model, registered (or found registered) first
        from lrsearch.service.session import register

        _quiet()
        registered = register(args.name, storage=args.storage, tracking=args.tracking_uri)
        # On stdout before a table; on stderr before JSON or CSV, which stay whole.
        print(
            f"model: {registered.uri} (version {registered.version}: trial {registered.trial}; "
            f"{'registered now' if registered.new else 'already registered'})",
            file=sys.stdout if args.format == "table" else sys.stderr,
        )
    rows = [
        {"number": r.pop("trial_number"), **r}
        for r in best_trials_sql(args.storage, args.tracking_uri, args.name, args.top)
    ]
    pbt = ["drawn", "copies"] if any(row.get("drawn") is not None for row in rows) else []
    columns = (
        ["rank", *TRIAL_COLUMNS, *pbt[1:]]
        if args.format == "table"
        else [
            "rank",
            "number",
            "value",
            "state",
            "params",
            *pbt,  # params: the sampled hyperparameters, each once (the views' typed columns repeat them)
            "epochs_trained",
            "duration_s",
            "wall_s",
            "mlflow_run_id",
            "mlflow_url",
            "mlflow_status",
            "val_acc",
            "val_loss",
            "train_loss",
            "model",
        ]
    )
    print(format_rows(rows, args.format, columns) if rows or args.format != "table" else "(no completed trials)")
    made = next((r for r in rows if r["model"]), None)  # the row of the trial the model was made from
    if args.format == "table" and made:
        print(model_line(made["model"], made["number"]))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from lrsearch.results.report import results_table, write_report

    _quiet()
    if args.table:
        print(results_table(args.name, storage=args.storage, tracking=args.tracking_uri))
        return EXIT_OK
    paths = write_report(
        args.name, storage=args.storage, tracking=args.tracking_uri, out=Path(args.out) if args.out else None
    )
    print(f"report: {paths[-1]} ({count(len(paths) - 1, 'figure')})")
    return EXIT_OK


def cmd_sql(args: argparse.Namespace) -> int:
    from lrsearch.sql.queries import ResultsDatabase
    from lrsearch.sql.readers import grant_reader
    from lrsearch.sql.schema import schema_script

    if args.schema:
        print(schema_script(args.storage, args.tracking_uri))
        return EXIT_OK
    if args.grant_reader:
        url = grant_reader(args.storage, args.grant_reader)
        print(
            f"role {args.grant_reader!r} may read the results; query as it with --storage {url} "
            f"(its password, if any, in PGPASSWORD)"
        )
        return EXIT_OK
    if not args.query:
        raise UsageError('expected a query, e.g. lrsearch sql "SELECT * FROM best_trials WHERE rank <= 3"')
    with ResultsDatabase(args.storage, args.tracking_uri, timeout=args.timeout, user_sql=True) as db:
        result = db.query(args.query)
    print(format_rows(result.records(), args.format, result.columns))
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    from lrsearch.core.names import trials_path
    from lrsearch.service.server import serve
    from lrsearch.store.urls import shown_host, sqlite_path, tracking_uri
    from lrsearch.track.tracking import Tracker

    uri = tracking_uri(args.tracking_uri)
    path = sqlite_path(uri)
    if path is not None and path.exists():  # each study's trials, at this UI's own address
        shown = shown_host(args.host)
        for name, experiment_id in Tracker(uri).study_experiments():
            print(f"study {name}: http://{shown}:{args.port}/{trials_path(experiment_id)}", file=sys.stderr)
    return serve(uri, host=args.host, port=args.port, quiet=not args.verbose)
