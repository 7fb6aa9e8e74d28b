"""The command line: a thin layer over the public API, and the only place that prints and exits.

Heavy modules (torch, Lightning, MLflow) are imported inside the commands, so ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from lrsearch.errors import LrsearchError, UsageError, first_line

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 runtime failure, 2 bad input, 130 interrupted)."""
    args = _parser().parse_args(argv)
    try:
        return args.command(args) or EXIT_OK
    except UsageError as e:
        return _fail(args, e, EXIT_USAGE, str(e))
    except LrsearchError as e:
        return _fail(args, e, EXIT_RUNTIME, str(e))
    except KeyboardInterrupt as e:
        return _fail(args, e, EXIT_INTERRUPTED, "interrupted")
    except Exception as e:  # anything unforeseen: still one line, --debug for the traceback
        return _fail(args, e, EXIT_RUNTIME, f"{type(e).__name__}: {first_line(e)}")


def _fail(args: argparse.Namespace, e: BaseException, code: int, message: str) -> int:
    if getattr(args, "debug", False):
        raise e
    print(f"lrsearch: error: {message}", file=sys.stderr)
    return code


# -- commands -----------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from lrsearch.config import load_config

    cfg = load_config(args.file)
    print(f"{args.file}: ok (study {cfg.study.name!r}, {cfg.study.sampler} sampler, "
          f"{len(cfg.params)} params)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from lrsearch.config import load_config

    cfg = load_config(args.file).with_overrides(trials=args.trials, epochs=args.epochs, name=args.name)
    _setup_workers()
    from lrsearch.study import best_trials, run_study

    with _Progress(cfg.study.name) as progress:
        result = run_study(cfg, storage=args.storage, tracking=args.tracking_uri,
                           study_file=Path(args.file), callbacks=[progress], on_start=progress.start)
    rows = best_trials(result.study, 5)
    print(f"study {cfg.study.name!r}: {len(result.study.trials)} trials "
          f"({_state_counts(result.study)}), target {result.target}")
    if rows:
        print(_format(rows, "table"))
    print(f"MLflow: {result.url}")
    return EXIT_OK


def cmd_best(args: argparse.Namespace) -> int:
    from lrsearch.study import best_trials, load_study

    rows = best_trials(load_study(args.name, args.storage), args.top)
    print(_format(rows, args.format))
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    from lrsearch.server import serve
    from lrsearch.storage import tracking_uri

    return serve(tracking_uri(args.tracking_uri), host=args.host, port=args.port)


# -- output -------------------------------------------------------------------------------

def _format(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    flat = [{"number": r["number"], "value": _num(r["value"]), "state": r["state"],
             "params": " ".join(f"{k}={_num(v)}" for k, v in r["params"].items()),
             "duration_s": _num(r["duration_s"]), "mlflow_run_id": r["mlflow_run_id"] or ""}
            for r in rows]
    columns = ["number", "value", "state", "params", "duration_s", "mlflow_run_id"]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return out.getvalue().rstrip("\n")
    if not flat:
        return "(no completed trials)"
    widths = {c: max(len(c), *(len(str(r[c])) for r in flat)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in flat]
    return "\n".join(line.rstrip() for line in lines)


def _num(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else value


def _state_counts(study: Any) -> str:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


class _Progress:
    """Trial n/N and the best value so far, on stderr."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Any = None

    def start(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=min(done, total), desc=self.name, unit="trial",
                        file=sys.stderr, dynamic_ncols=True)

    def __call__(self, study: Any, trial: Any) -> None:
        from lrsearch.study import FINISHED_STATES, best_trials

        if self.bar is None or trial.state not in FINISHED_STATES:
            return
        self.bar.update(1)
        best = best_trials(study, 1)
        if best:
            self.bar.set_postfix_str(f"best {best[0]['value']:.4g} (trial {best[0]['number']})")

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _setup_workers() -> None:
    """Process-wide settings for a process that trains: quiet libraries, one torch thread
    (faster than several for these small networks, and fair to parallel workers)."""
    import optuna
    import torch

    from lrsearch.training import quiet_lightning

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(int(os.environ.get("LRSEARCH_TORCH_THREADS", "1")))
    quiet_lightning()


# -- parser -------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser("run", help="run (or resume) a study from a TOML study file")
    p.add_argument("file", help="study file, e.g. studies/quickstart.toml")
    p.add_argument("--trials", type=_positive_int, metavar="N", help="the study's total number of trials")
    p.add_argument("--epochs", type=_positive_int, metavar="N", help="epochs per trial")
    p.add_argument("--name", metavar="NAME", help="study name (default: [study].name)")
    stores(p)
    p.set_defaults(command=cmd_run)

    p = sub.add_parser("best", help="show a study's best trials")
    p.add_argument("name", help="study name")
    p.add_argument("--top", type=_positive_int, default=10, metavar="N")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    stores(p)
    p.set_defaults(command=cmd_best)

    p = sub.add_parser("validate", help="check a study file and exit (2 on a mistake)")
    p.add_argument("file")
    p.set_defaults(command=cmd_validate)

    p = sub.add_parser("ui", help="serve the MLflow UI on the embedded store")
    p.add_argument("--port", type=_positive_int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--tracking-uri", metavar="URI", help="tracking store (default: the embedded one)")
    p.set_defaults(command=cmd_ui)
    return parser


if __name__ == "__main__":
    sys.exit(main())
