"""The commands: each parses nothing and decides nothing; it calls the library and prints.
The ones that read a study's results (best, report, sql, ui) are in ``result_commands.py``.

Heavy modules (torch, Lightning, MLflow) are imported inside the commands, so ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lrsearch.cli.output import Progress, format_rows, print_result, warn
from lrsearch.core.errors import ConfigError, LrsearchError, UsageError, first_line
from lrsearch.core.text import count

if TYPE_CHECKING:
    import optuna

    from lrsearch.config import Config
    from lrsearch.service.launch import StudyRun
    from lrsearch.track.process import TrackerLike, TrackingProcess

EXIT_OK = 0


def cmd_validate(args: argparse.Namespace) -> int:
    from lrsearch.choices.data import check_data
    from lrsearch.config import load_config

    cfg = load_config(args.file)
    check_data(cfg.data)  # the data's mistakes too: submit would refuse them
    print(f"{args.file}: ok (study {cfg.study.name!r}, {cfg.study.sampler} sampler, {len(cfg.params)} params)")
    if cfg.finds_lr:  # the range it has, or would have if created now
        from lrsearch.service.queue import search_range

        _quiet()  # the range test trains
        found = search_range(cfg, storage=args.storage)
        line = f"lr: {found.low:.3g} to {found.high:.3g}, log scale "
        if found.stored_in is not None:
            print(
                line + f"(stored with the study in {_redact(found.stored_in)}: the range test suggested "
                f"{found.suggestion:.3g} for {found.optimizer})"
            )
        else:
            print(
                line + f"(the range test suggests {found.suggestion:.3g} for {found.optimizer}; stored with "
                "the study when it is created)"
            )
    return EXIT_OK


def cmd_lr_find(args: argparse.Namespace) -> int:
    from lrsearch.choices.data import check_data
    from lrsearch.config import load_config
    from lrsearch.fit.lr_find import MAX_LR, MIN_LR, STEPS, SWEEPS, range_test, record_range_test
    from lrsearch.store.folders import report_dir
    from lrsearch.store.urls import storage_url, tracking_uri
    from lrsearch.track.tracking import Tracker

    cfg = load_config(args.file)
    check_data(cfg.data)  # before any store is opened (the range test reuses what it read)
    accelerator = _accelerator(args, cfg)
    _quiet()
    result = range_test(cfg, args.optimizer, args.factor, accelerator)  # "no clear minimum": exit 1, nothing written
    tracker = Tracker(tracking_uri(args.tracking_uri))
    tracker.check()
    experiment_id = tracker.experiment(cfg.study.name)
    path, run_id = record_range_test(
        result, cfg, tracker, experiment_id, report_dir(storage_url(args.storage), cfg.study.name)
    )
    url = tracker.run_url(experiment_id, run_id)
    if args.format == "json":
        print(json.dumps({**result.record(), "plot": str(path), "mlflow_run_id": run_id, "mlflow": url}, indent=2))
        return EXIT_OK
    sweeps = ", ".join("none" if s.suggestion is None else f"{s.suggestion:.3g}" for s in result.sweeps)
    print(
        f"lr-find {cfg.study.name}: {result.optimizer}, batch size {cfg.train.batch_size}, {SWEEPS} sweeps of "
        f"{STEPS} rates from {MIN_LR:g} to {MAX_LR:g} (Lightning's Tuner.lr_find)"
    )
    print(f"suggested learning rate: {result.suggestion:.3g} (the median of the sweeps: {sweeps})")
    print(
        f"search range: {result.low:.3g} to {result.high:.3g} (lr = {{ low = {result.low:.3g}, "
        f"high = {result.high:.3g}, log = true }}, or lr = {{ find = true }})"
    )
    print(f"plot: {path}")
    print(f"MLflow: {url}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from lrsearch.store.urls import tracking_uri
    from lrsearch.track.process import TrackingProcess

    cfg = _study_config(args)
    _accelerator(args, cfg)
    tracker = TrackingProcess(tracking_uri(args.tracking_uri), args.worker_index or 0)  # MLflow, imported meanwhile
    if not args.no_report:
        tracker.prepare_report()  # it draws some of the report's figures
    try:
        result = _run(args, cfg, workers=args.workers, tracker=tracker)
        print_result(result, cfg.study.sampler, args.tracking_uri, result.warnings)
        if result.errors:
            raise LrsearchError(f"{result.errors[0]}; run the same command again to resume")
        if result.cancelled:
            raise LrsearchError(
                f"study {cfg.study.name!r} was cancelled (lrsearch cancel); run or submit "
                "the same file again to resume it"
            )
        if not args.no_report:
            _report(args, cfg, result.study, tracker)
    finally:
        tracker.close()
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from lrsearch.service.queue import submit
    from lrsearch.store.urls import tracking_uri
    from lrsearch.track.links import links

    cfg = _study_config(args)
    if cfg.finds_lr:  # the range test trains: quiet the libraries (nothing else imports them)
        _quiet()
    sub = submit(cfg, storage=args.storage, tracking=args.tracking_uri)
    print(
        f"study {sub.name!r} {'resubmitted' if sub.resumed else 'submitted'}: {count(sub.target, 'trial')}, "
        f"for any `lrsearch worker` on {_redact(sub.url)}"
    )
    if sub.parent_run_id is not None and sub.experiment_id is not None:
        print("\n".join(links(tracking_uri(args.tracking_uri), sub.experiment_id, sub.parent_run_id)))
    else:
        print(
            "MLflow: the study's run and trials appear once a worker starts it (`lrsearch status` then shows the link)"
        )
    print(f"watch it: lrsearch status {sub.name} --watch{_store_flags(args)}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from lrsearch.service.queue import STATUS_COLUMNS, status

    try:
        while True:
            rows = status(args.name, storage=args.storage, tracking=args.tracking_uri)
            text = (
                format_rows(rows, args.format, STATUS_COLUMNS)
                if rows or args.format != "table"
                else "(no submitted studies)"
            )
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
    from lrsearch.core.stopping import watch_parent

    watch_parent()
    if args.worker_index is None:
        from lrsearch.service.worker_process import default_index

        args.worker_index = default_index()
    if args.file is None:
        return _serve(args)
    if args.max_idle is not None:
        raise UsageError("--max-idle: only without a study file (a worker with a file ends with its study)")
    cfg = _study_config(args)
    _accelerator(args, cfg)
    result = _run(args, cfg, progress=False)
    if args.quiet:
        warn(result.warnings)
    else:  # as run ends
        print_result(result, cfg.study.sampler, args.tracking_uri, result.warnings)
    return EXIT_OK


def cmd_server(args: argparse.Namespace) -> int:
    from lrsearch.service.server import serve

    return serve(
        args.db,
        host=args.host,
        port=args.port,
        allowed_hosts=args.allowed_hosts,
        artifacts=str(Path(args.artifacts).resolve()) if args.artifacts else None,
        workers=args.workers,
        auth=args.auth,
    )


def _accelerator(args: argparse.Namespace, cfg: Config | None = None) -> str | None:
    """Lightning's accelerator for this host's training (``--accelerator``, else the study's),
    checked here, before anything is made: a GPU this host lacks is a usage error."""
    from lrsearch.choices.accelerators import unavailable

    name = args.accelerator or (cfg.train.accelerator if cfg is not None else None)
    if name is not None and (why := unavailable(name)) is not None:
        if args.accelerator or cfg is None:
            raise UsageError(f"--accelerator: {why}")
        raise ConfigError(args.file, "[train].accelerator", why)
    return name


def _study_config(args: argparse.Namespace) -> Config:
    from lrsearch.config import load_config

    return load_config(args.file).with_overrides(trials=args.trials, epochs=args.epochs, name=args.name)


def _run(
    args: argparse.Namespace,
    cfg: Config,
    workers: int = 1,
    progress: bool = True,
    tracker: TrackingProcess | None = None,
) -> StudyRun:
    """Run the study here (and in ``workers - 1`` more processes) until its total is reached."""
    from lrsearch.core.stopping import StopFlag
    from lrsearch.service.launch import run_study

    stop = StopFlag()
    stop.install()
    with Progress(cfg.study.name, enabled=progress) as bar:
        return run_study(
            cfg,
            storage=args.storage,
            tracking=args.tracking_uri,
            study_file=Path(args.file),
            workers=workers,
            callbacks=[bar],
            on_start=bar.start,
            stop=stop,
            worker=args.worker_index,
            array=args.array,
            accelerator=args.accelerator,
            tracker=tracker,
        )


def _serve(args: argparse.Namespace) -> int:
    """``lrsearch worker`` with no file: every submitted study, until stopped or idle."""
    from lrsearch.core.stopping import StopFlag

    for flag in ("trials", "epochs", "name"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag}: only with a study file (submitted studies keep their own)")
    _accelerator(args)
    stop = StopFlag()
    stop.install()
    from lrsearch.store.urls import tracking_uri
    from lrsearch.track.process import TrackingProcess

    tracker = TrackingProcess(tracking_uri(args.tracking_uri), args.worker_index)  # MLflow, imported meanwhile
    from lrsearch.service.worker import serve
    from lrsearch.service.worker_process import setup_process

    setup_process()

    def say(line: str) -> None:  # what the worker is doing, on stderr: stdout is for the summary
        if not args.quiet:
            print(f"worker {args.worker_index}: {line}", file=sys.stderr, flush=True)

    def announce(line: str) -> None:
        warn([line])
        sys.stderr.flush()

    say(
        f"serving the studies submitted to {_redact(_storage(args))}"
        + (f" (until idle for {args.max_idle:g} s)" if args.max_idle else "")
    )
    try:
        served = serve(
            args.storage,
            args.tracking_uri,
            index=args.worker_index,
            stop=stop,
            max_idle=args.max_idle,
            warn=announce,
            say=None if args.quiet else say,
            array=args.array,
            accelerator=args.accelerator,
            tracker=tracker,
        )
    finally:
        tracker.close()
    warn(served.warnings)
    say(f"idle for {args.max_idle:g} s, done")
    if not args.quiet:  # each study it trained, as run ends
        for session in served.sessions:  # (their warnings are above)
            print_result(session, session.cfg.study.sampler, args.tracking_uri, [])
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


def _report(args: argparse.Namespace, cfg: Config, study: optuna.Study, tracker: TrackerLike) -> None:
    """The study's report, at the end of `run`; a failure to draw it is a warning only."""
    from lrsearch.results.report import write_report

    try:
        paths = write_report(
            cfg.study.name, storage=args.storage, tracking=args.tracking_uri, study=study, tracker=tracker
        )
    except Exception as e:
        warn([f"could not write the study's report: {first_line(e)}"])
        return
    print(f"report: {paths[-1]}")


def _quiet() -> None:
    import optuna

    from lrsearch.track.quiet import quiet_mlflow

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    quiet_mlflow()
