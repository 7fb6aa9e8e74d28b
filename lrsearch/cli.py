"""The command line: a thin layer over the public API, and the only place that prints and exits.

Heavy modules (torch, Lightning, MLflow) are imported inside the commands, so ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from lrsearch.core.errors import ERROR_PREFIX, WARNING_PREFIX, LrsearchError, UsageError, first_line

EXIT_OK, EXIT_RUNTIME, EXIT_INTERRUPTED = 0, 1, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a program killed by the closed pipe would exit


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 runtime failure, 2 bad input, 130 interrupted)."""
    args = _parser().parse_args(argv)
    try:
        return args.command(args) or EXIT_OK
    except BrokenPipeError:  # `lrsearch sql … | head`: the reader has all it wanted
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except LrsearchError as e:  # UsageError: 2, Interrupted: 128 + signal, others: 1
        return _fail(args, e, e.exit_code, str(e))
    except KeyboardInterrupt as e:
        return _fail(args, e, EXIT_INTERRUPTED, "interrupted")
    except Exception as e:  # anything unforeseen: still one line, --debug for the traceback
        return _fail(args, e, EXIT_RUNTIME, f"{type(e).__name__}: {first_line(e)}")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush meets no closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _fail(args: argparse.Namespace, e: BaseException, code: int, message: str) -> int:
    if getattr(args, "debug", False):
        raise e
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr)
    return code


# -- commands -----------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from lrsearch.config import load_config
    from lrsearch.choices.data import check_data

    cfg = load_config(args.file)
    check_data(cfg.data)  # the data's mistakes too: submit would refuse them
    print(f"{args.file}: ok (study {cfg.study.name!r}, {cfg.study.sampler} sampler, "
          f"{len(cfg.params)} params)")
    if cfg.finds_lr:  # the range it has, or would have if created now
        from lrsearch.fit.lr_find import range_test
        from lrsearch.service.queue import stored_range
        from lrsearch.store.urls import redact, storage_url

        url = storage_url(args.storage)
        found = stored_range(url, cfg.study.name)
        if found is not None:
            print(f"lr: {found['low']:.3g} to {found['high']:.3g}, log scale (stored with the study in {redact(url)}: "
                  f"the range test suggested {found['suggestion']:.3g} for {found['optimizer']})")
        else:
            _quiet()
            result = range_test(cfg)
            print(f"lr: {result.low:.3g} to {result.high:.3g}, log scale (the range test suggests "
                  f"{result.suggestion:.3g} for {result.optimizer}; stored with the study when it is created)")
    return EXIT_OK


def cmd_lr_find(args: argparse.Namespace) -> int:
    from lrsearch.config import load_config
    from lrsearch.choices.data import check_data
    from lrsearch.fit.lr_find import MAX_LR, MIN_LR, STEPS, SWEEPS, range_test, record_range_test
    from lrsearch.store.storage import report_dir
    from lrsearch.store.urls import storage_url, tracking_uri
    from lrsearch.track.tracking import Tracker

    cfg = load_config(args.file)
    check_data(cfg.data)  # before any store is opened (the range test reuses what it read)
    _quiet()
    result = range_test(cfg, args.optimizer, args.factor)  # "no clear minimum": exit 1, nothing written
    tracker = Tracker(tracking_uri(args.tracking_uri))
    tracker.check()
    experiment_id = tracker.experiment(cfg.study.name)
    path, run_id = record_range_test(result, cfg, tracker, experiment_id,
                                     report_dir(storage_url(args.storage), cfg.study.name))
    url = tracker.run_url(experiment_id, run_id)
    if args.format == "json":
        print(json.dumps({**result.record(), "plot": str(path), "mlflow_run_id": run_id, "mlflow": url}, indent=2))
        return EXIT_OK
    sweeps = ", ".join("none" if s.suggestion is None else f"{s.suggestion:.3g}" for s in result.sweeps)
    print(f"lr-find {cfg.study.name}: {result.optimizer}, batch size {cfg.train.batch_size}, {SWEEPS} sweeps of "
          f"{STEPS} rates from {MIN_LR:g} to {MAX_LR:g} (Lightning's Tuner.lr_find)")
    print(f"suggested learning rate: {result.suggestion:.3g} (the median of the sweeps: {sweeps})")
    print(f"search range: {result.low:.3g} to {result.high:.3g} (lr = {{ low = {result.low:.3g}, "
          f"high = {result.high:.3g}, log = true }}, or lr = {{ find = true }})")
    print(f"plot: {path}")
    print(f"MLflow: {url}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _study_config(args)
    result = _run(args, cfg, workers=args.workers)
    _print_result(result.study, result.target, result.experiment_id, result.parent_run_id, args.tracking_uri,
                  result.warnings)
    if result.errors:
        raise LrsearchError(f"{result.errors[0]}; run the same command again to resume")
    if result.cancelled:
        raise LrsearchError(f"study {cfg.study.name!r} was cancelled (lrsearch cancel); run or submit "
                            "the same file again to resume it")
    if not args.no_report:
        _report(args, cfg, result.study)
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from lrsearch.service.queue import submit
    from lrsearch.store.urls import tracking_uri
    from lrsearch.track.tracking import links

    cfg = _study_config(args)
    if cfg.finds_lr:  # the range test trains: quiet the libraries (nothing else imports them)
        _quiet()
    sub = submit(cfg, storage=args.storage, tracking=args.tracking_uri)
    print(f"study {sub.name!r} {'resubmitted' if sub.resumed else 'submitted'}: {sub.target} trials, "
          f"for any `lrsearch worker` on {_redact(sub.url)}")
    if sub.parent_run_id is not None:
        print("\n".join(links(tracking_uri(args.tracking_uri), sub.experiment_id, sub.parent_run_id)))
    else:
        print("MLflow: the study's run and trials appear once a worker starts it (`lrsearch status` "
              "then shows the link)")
    print(f"watch it: lrsearch status {sub.name} --watch{_store_flags(args)}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from lrsearch.service.queue import STATUS_COLUMNS, status

    try:
        while True:
            rows = status(args.name, storage=args.storage, tracking=args.tracking_uri)
            text = _format(rows, args.format, STATUS_COLUMNS) if rows or args.format != "table" else \
                "(no submitted studies)"
            if not args.watch:
                print(text)
                return EXIT_OK
            print(("\033[H\033[J" if sys.stdout.isatty() else "") + text, flush=True)
            if rows and all(r["state"] in ("done", "cancelled") for r in rows):
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        if not args.watch:
            raise
        # Ctrl-C is how a watch is left: the normal end, not an error (the studies go on).
        return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from lrsearch.service.queue import cancel

    _quiet()
    print(cancel(args.name, now=args.now, storage=args.storage, tracking=args.tracking_uri))
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from lrsearch.results.ranking import state_counts
    from lrsearch.core.stopping import watch_parent

    watch_parent()
    if args.worker_index is None:
        args.worker_index = _default_worker_index()
    if args.file is None:
        return _serve(args)
    if args.max_idle is not None:
        raise UsageError("--max-idle: only without a study file (a worker with a file ends with its study)")
    result = _run(args, _study_config(args), progress=False)
    print(f"worker {args.worker_index}: study {result.study.study_name!r} done "
          f"({state_counts(result.study)}), target {result.target}", file=sys.stderr)
    _warn(result.warnings)
    return EXIT_OK


def cmd_server(args: argparse.Namespace) -> int:
    from lrsearch.service.server import serve

    return serve(args.db, host=args.host, port=args.port, allowed_hosts=args.allowed_hosts,
                 artifacts=str(Path(args.artifacts).resolve()) if args.artifacts else None,
                 workers=args.workers, auth=args.auth)


def _study_config(args: argparse.Namespace) -> Any:
    from lrsearch.config import load_config

    return load_config(args.file).with_overrides(trials=args.trials, epochs=args.epochs, name=args.name)


def _run(args: argparse.Namespace, cfg: Any, workers: int = 1, progress: bool = True) -> Any:
    """Run the study here (and in ``workers - 1`` more processes) until its total is reached."""
    from lrsearch.service.launch import run_study
    from lrsearch.core.stopping import StopFlag

    stop = StopFlag()
    stop.install()
    with _Progress(cfg.study.name, enabled=progress) as bar:
        return run_study(cfg, storage=args.storage, tracking=args.tracking_uri, study_file=Path(args.file),
                         workers=workers, callbacks=[bar], on_start=bar.start, stop=stop,
                         worker=args.worker_index, array=args.array)


def _serve(args: argparse.Namespace) -> int:
    """``lrsearch worker`` with no file: every submitted study, until stopped or idle."""
    from lrsearch.core.stopping import StopFlag

    for flag in ("trials", "epochs", "name"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag}: only with a study file (submitted studies keep their own)")
    stop = StopFlag()
    stop.install()
    from lrsearch.service.worker import serve, setup_process

    setup_process()
    print(f"worker {args.worker_index}: serving the studies submitted to {_redact(_storage(args))}"
          + (f" (until idle for {args.max_idle:g} s)" if args.max_idle else ""), file=sys.stderr, flush=True)

    def announce(line: str) -> None:
        _warn([line])
        sys.stderr.flush()

    _warn(serve(args.storage, args.tracking_uri, index=args.worker_index, stop=stop, max_idle=args.max_idle,
                warn=announce, array=args.array))
    print(f"worker {args.worker_index}: idle for {args.max_idle:g} s, done", file=sys.stderr)
    return EXIT_OK


def _storage(args: argparse.Namespace) -> str:
    from lrsearch.store.urls import storage_url

    return storage_url(args.storage)


def _redact(url: str) -> str:
    from lrsearch.store.urls import redact

    return redact(url)


def _store_flags(args: argparse.Namespace) -> str:
    """The ``--storage``/``--tracking-uri`` a follow-up command needs (passwords left out)."""
    flags = ""
    if args.storage:
        flags += f" --storage {_redact(args.storage)}"
    if args.tracking_uri:
        flags += f" --tracking-uri {_redact(args.tracking_uri)}"
    return flags


def _default_worker_index() -> int:
    """Distinct per process and per host (in containers every worker may be pid 1)."""
    import socket
    import zlib

    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())


def _report(args: argparse.Namespace, cfg: Any, study: Any) -> None:
    """The study's report, at the end of `run`; a failure to draw it is a warning only."""
    from lrsearch.results.report import write_report

    try:
        paths = write_report(cfg.study.name, storage=args.storage, tracking=args.tracking_uri, study=study)
    except Exception as e:
        _warn([f"could not write the study's report: {first_line(e)}"])
        return
    print(f"report: {paths[-1]}")


def _print_result(study: Any, target: int, experiment_id: str, parent_run_id: str, tracking: str | None,
                  warnings: list[str]) -> None:
    """The study's top trials as `lrsearch best` shows them, and where MLflow shows the rest."""
    from lrsearch.results.ranking import best_trials, state_counts
    from lrsearch.store.urls import tracking_uri
    from lrsearch.track.tracking import links, trial_link

    uri = tracking_uri(tracking)
    rows = [{**r, "mlflow": trial_link(uri, experiment_id, r["mlflow_run_id"])} for r in best_trials(study, 5)]
    print(f"study {study.study_name!r}: {len(study.trials)} trials ({state_counts(study)}), target {target}")
    if rows:
        print(_format(rows, "table", TRIAL_COLUMNS))
    print("\n".join(links(uri, experiment_id, parent_run_id)))
    _warn(warnings)


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"{WARNING_PREFIX}{line}", file=sys.stderr)


def cmd_best(args: argparse.Namespace) -> int:
    from lrsearch.sql.queries import best_trials_sql

    rows = [{"number": r.pop("trial_number"), **r} for r in
            best_trials_sql(args.storage, args.tracking_uri, args.name, args.top)]
    columns = ["rank", *TRIAL_COLUMNS] if args.format == "table" else [
        "rank", "number", "value", "state", "params", "optimizer", "lr", "momentum", "schedule",
        "duration_s", "mlflow_run_id", "mlflow", "mlflow_status", "val_acc", "val_loss", "train_loss"]
    print(_format(rows, args.format, columns) if rows or args.format != "table" else "(no completed trials)")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from lrsearch.results.report import results_table, write_report

    _quiet()
    if args.table:
        print(results_table(args.name, storage=args.storage, tracking=args.tracking_uri))
        return EXIT_OK
    paths = write_report(args.name, storage=args.storage, tracking=args.tracking_uri,
                         out=Path(args.out) if args.out else None)
    print(f"report: {paths[-1]} ({len(paths) - 1} figures)")
    return EXIT_OK


def cmd_sql(args: argparse.Namespace) -> int:
    from lrsearch.sql.queries import ResultsDatabase, grant_reader, schema_script

    if args.schema:
        print(schema_script(args.storage, args.tracking_uri))
        return EXIT_OK
    if args.grant_reader:
        url = grant_reader(args.storage, args.grant_reader)
        print(f"role {args.grant_reader!r} may read the results; query as it with --storage {url} "
              f"(its password, if any, in PGPASSWORD)")
        return EXIT_OK
    if not args.query:
        raise UsageError("expected a query, e.g. lrsearch sql \"SELECT * FROM best_trials WHERE rank <= 3\"")
    with ResultsDatabase(args.storage, args.tracking_uri, timeout=args.timeout, user_sql=True) as db:
        result = db.query(args.query)
    print(_format(result.records(), args.format, result.columns))
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


# -- output -------------------------------------------------------------------------------

# `run`'s summary and `best`: the same columns (mlflow: the run's page on a tracking server,
# else its id).
TRIAL_COLUMNS = ["number", "value", "state", "params", "duration_s", "mlflow"]


def _format(rows: list[dict[str, Any]], fmt: str, columns: list[str] | None = None) -> str:
    """Rows as a text table, JSON (a list of objects) or CSV."""
    columns = columns or (list(rows[0]) if rows else [])
    if fmt == "json":
        return json.dumps([{c: row.get(c) for c in columns} for row in rows], indent=2, default=str)
    cells = [[_cell(row.get(c), fmt) for c in columns] for row in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(cells)
        return out.getvalue().rstrip("\n")
    if not rows:
        return "(no rows)"
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def _cell(value: Any, fmt: str) -> str:
    """A table cell as the MLflow descriptions write numbers and params; a CSV cell exact."""
    from lrsearch.core.text import fmt as readable, params_text

    if value is None:
        return ""
    if fmt == "csv":
        return json.dumps(value) if isinstance(value, dict) else str(value)
    return params_text(value, sep=" ") if isinstance(value, dict) else readable(value)


class _Progress:
    """Trials n/N (COMPLETE + PRUNED) and the best value so far, on stderr."""

    def __init__(self, name: str, enabled: bool = True) -> None:
        self.name = name
        self.enabled = enabled
        self.bar: Any = None

    def start(self, total: int, done: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=min(done, total), desc=self.name, unit="trial",
                        file=sys.stderr, dynamic_ncols=True)

    def __call__(self, study: Any, trial: Any) -> None:
        self.refresh(study)

    def refresh(self, study: Any) -> None:
        """Show the study's state as its store has it (any worker's trials count)."""
        from lrsearch.results.ranking import best_trials, count_finished

        if self.bar is None:
            return
        self.bar.n = min(count_finished(study), self.bar.total)
        best = best_trials(study, 1)
        if best:
            self.bar.set_postfix_str(f"best {best[0]['value']:.4g} (trial {best[0]['number']})", refresh=False)
        self.bar.refresh()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _quiet() -> None:
    import optuna

    from lrsearch.track.tracking import quiet_mlflow

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    quiet_mlflow()


# -- parser -------------------------------------------------------------------------------

def _option(kind: type, constraint: Any) -> Any:
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


def _parser() -> argparse.ArgumentParser:
    from lrsearch.core.names import DEFAULT_UI_PORT

    parser = argparse.ArgumentParser(
        prog="lrsearch",
        description="Search learning rate, momentum, schedule and optimizer with Optuna; "
                    "train with Lightning; track in MLflow.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def stores(p: argparse.ArgumentParser) -> None:
        p.add_argument("--storage", metavar="URL",
                       help="Optuna storage URL (default: $LRSEARCH_STORAGE or ./lrsearch-data/optuna.db)")
        p.add_argument("--tracking-uri", metavar="URI",
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./lrsearch-data/mlflow.db)")

    def array_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--array", type=_array, metavar="K",
                       help='trials trained at once, in one fit: "auto" (timed here) or K '
                            "(default: the study's [train] array, itself \"auto\" by default)")

    def study_options(p: argparse.ArgumentParser, file_required: bool = True) -> None:
        p.add_argument("file", nargs=None if file_required else "?", help="study file, e.g. studies/quickstart.toml")
        p.add_argument("--trials", type=_positive_int, metavar="N", help="the study's total number of trials")
        p.add_argument("--epochs", type=_positive_int, metavar="N", help="epochs per trial")
        p.add_argument("--name", metavar="NAME", help="study name (default: [study].name)")
        stores(p)

    p = sub.add_parser("run", help="run (or resume) a study from a TOML study file")
    study_options(p)
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="worker processes on this host (default 1: trials run in this process)")
    array_option(p)
    p.add_argument("--no-report", action="store_true",
                   help="skip the end-of-study report (lrsearch report NAME draws it later)")
    p.set_defaults(command=cmd_run, worker_index=0)

    p = sub.add_parser("submit", help="queue a study for the workers (creates or resumes it) and return")
    study_options(p)
    p.set_defaults(command=cmd_submit)

    p = sub.add_parser("worker", help="serve every submitted study (or, with FILE, that one study) from any host")
    study_options(p, file_required=False)
    p.add_argument("--max-idle", type=_positive_float, metavar="S",
                   help="without FILE: exit after S seconds with nothing to do (default: serve until stopped)")
    p.add_argument("--worker-index", type=int, default=None, metavar="I",
                   help="this worker's index, for its sampler seed (default: from the host and process id)")
    array_option(p)
    p.set_defaults(command=cmd_worker)

    p = sub.add_parser("status", help="the submitted studies: state, progress, best value, workers, time left")
    p.add_argument("name", nargs="?", help="one study (default: all)")
    p.add_argument("--watch", action="store_true", help="refresh until every study shown is done or cancelled")
    p.add_argument("--interval", type=_positive_float, default=2.0, metavar="S", help="with --watch (default 2)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    stores(p)
    p.set_defaults(command=cmd_status)

    p = sub.add_parser("cancel", help="stop a study: no new trials (submit it again to resume)")
    p.add_argument("name", help="study name")
    p.add_argument("--now", action="store_true",
                   help="also stop its running trials at their next epoch (FAIL, reason 'cancelled')")
    stores(p)
    p.set_defaults(command=cmd_cancel)

    p = sub.add_parser("server", help="the MLflow tracking server on a PostgreSQL (or SQLite) database")
    p.add_argument("--db", metavar="URL", help="postgresql+psycopg://user@host/db (default: $LRSEARCH_DB, "
                                                "which keeps a password off the command line)")
    p.add_argument("--auth", action="store_true",
                   help="require a login (MLflow's basic-auth app; admin from $MLFLOW_AUTH_ADMIN_USERNAME and "
                        "$MLFLOW_AUTH_ADMIN_PASSWORD)")
    p.add_argument("--artifacts", metavar="DIR", help="where the server stores artifacts "
                   "(default: ./lrsearch-data/artifacts)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=_positive_int, default=5000)
    p.add_argument("--allowed-hosts", metavar="HOSTS",
                   help="Host headers MLflow accepts when bound beyond loopback, e.g. mlflow:5000")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="uvicorn worker processes (default 1: see docs/performance.md)")
    p.set_defaults(command=cmd_server)

    p = sub.add_parser("best", help="show a study's best trials")
    p.add_argument("name", help="study name")
    p.add_argument("--top", type=_positive_int, default=10, metavar="N", help="the N best trials (default: 10)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    stores(p)
    p.set_defaults(command=cmd_best)

    p = sub.add_parser("report", help="draw a study's figures and HTML report from the stores")
    p.add_argument("name", help="study name")
    p.add_argument("--out", metavar="DIR", help="folder for the files (default: ./lrsearch-data/reports/NAME)")
    p.add_argument("--table", action="store_true",
                   help="print the Markdown results table (final val acc, first epoch >= 0.80) instead")
    stores(p)
    p.set_defaults(command=cmd_report)

    p = sub.add_parser("sql", help="run a read-only SQL query over the results views")
    p.add_argument("query", nargs="?", help='e.g. "SELECT * FROM best_trials WHERE rank <= 3"')
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--schema", action="store_true", help="print the SQL that creates the views and exit")
    p.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S",
                   help="stop the query after S seconds (default 30)")
    p.add_argument("--grant-reader", metavar="ROLE",
                   help="PostgreSQL: create ROLE, which may only read the results (password from "
                        "$LRSEARCH_READER_PASSWORD), and exit; needs a superuser's --storage")
    stores(p)
    p.set_defaults(command=cmd_sql)

    p = sub.add_parser("validate", help="check a study file and exit (2 on a mistake)")
    p.add_argument("file")
    p.add_argument("--storage", metavar="URL", help="where a study with lr = { find = true } may have its range "
                                                     "(default: $LRSEARCH_STORAGE or ./lrsearch-data/optuna.db)")
    p.set_defaults(command=cmd_validate)

    p = sub.add_parser("lr-find", help="the learning-rate range test on a study's data and model")
    p.add_argument("file", help="study file, e.g. studies/quickstart.toml")
    p.add_argument("--optimizer", metavar="NAME", help="default: the study's (its first choice when searched)")
    p.add_argument("--factor", type=_factor, metavar="F",
                   help="the search range: suggestion / F to suggestion × F (default: lr's factor, else 10)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    stores(p)
    p.set_defaults(command=cmd_lr_find)

    p = sub.add_parser("ui", help="serve the MLflow UI on the embedded store")
    p.add_argument("--port", type=_positive_int, default=DEFAULT_UI_PORT)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--tracking-uri", metavar="URI", help="tracking store (default: the embedded one)")
    p.add_argument("--verbose", action="store_true",
                   help="also show the MLflow server's own log: its INFO lines and one line per request")
    p.set_defaults(command=cmd_ui)
    return parser


def entry() -> None:
    """The ``lrsearch`` executable: :func:`main`, then a quick exit.

    A process that imported torch, Lightning and MLflow spends seconds tearing the
    interpreter down (module and object finalization) after everything is written, closed
    and drained; a command that trained skips that with ``os._exit`` once its output is
    flushed. Imported as a library, :func:`main` returns normally.
    """
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        code = EXIT_BROKEN_PIPE
    if "torch" in sys.modules:
        import logging

        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
