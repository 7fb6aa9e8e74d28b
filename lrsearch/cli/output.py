"""What the commands print: tables (text, JSON, CSV), warnings, run's summary and progress bar."""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import TYPE_CHECKING, Any

from lrsearch.core.errors import WARNING_PREFIX
from lrsearch.core.study_record import StudyRecord
from lrsearch.core.text import count

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from lrsearch.service.launch import StudyRun
    from lrsearch.service.session import ArrayUse, Session

# `run`'s summary and `best`: the same columns (mlflow: the run's page on a tracking server,
# else its id).
TRIAL_COLUMNS = ["number", "value", "state", "params", "duration_s", "wall_s", "mlflow"]


def format_rows(rows: list[dict[str, Any]], fmt: str, columns: list[str] | None = None) -> str:
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
    from lrsearch.core.text import fmt as readable
    from lrsearch.core.text import params_text

    if value is None:
        return ""
    if fmt == "csv":
        return json.dumps(value) if isinstance(value, dict) else str(value)
    return params_text(value, sep=" ") if isinstance(value, dict) else readable(value)


class Progress:
    """Trials n/N (COMPLETE + PRUNED) and the best value so far, on stderr: counted from the
    trials that end here, and read from the store (where other workers' trials count too)
    at most every ``REFRESH_S`` (a read of the whole study costs more than an array's trial)."""

    REFRESH_S = 1.0

    def __init__(self, name: str, enabled: bool = True) -> None:
        self.name = name
        self.enabled = enabled
        self.bar: Any = None  # tqdm's bar (tqdm has no type information)
        self._read_at = 0.0
        self._best: tuple[float, int] | None = None
        self._maximize = True
        self._counted: set[int] = set()  # the finished trials the bar counts, by number

    def start(self, total: int, done: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=min(done, total), desc=self.name, unit="trial", file=sys.stderr, dynamic_ncols=True
        )

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        import time

        if self.bar is None:
            return
        if time.monotonic() - self._read_at >= self.REFRESH_S:
            self.refresh(study)
            return
        if trial.state.name in ("COMPLETE", "PRUNED") and trial.number not in self._counted:
            # (an array's trials end together: the last read may have counted it already)
            self._counted.add(trial.number)
            self.bar.n = min(len(self._counted), self.bar.total)
        if (
            trial.state.name == "COMPLETE"
            and trial.value is not None
            and (self._best is None or (trial.value > self._best[0]) == self._maximize and trial.value != self._best[0])
        ):
            self._show_best(trial.value, trial.number)
        self.bar.refresh()

    def refresh(self, study: optuna.Study) -> None:
        """Show the study's state as its store has it (any worker's trials count)."""
        import time

        from lrsearch.results.ranking import FINISHED_STATES, best_trials, direction

        if self.bar is None:
            return
        self._read_at = time.monotonic()
        self._maximize = direction(study) == "maximize"
        self._counted = {t.number for t in study.get_trials(deepcopy=False, states=FINISHED_STATES)}
        self.bar.n = min(len(self._counted), self.bar.total)
        best = best_trials(study, 1)
        if best:
            self._show_best(best[0]["value"], best[0]["number"])
        self.bar.refresh()

    def _show_best(self, value: float, number: int) -> None:
        self._best = (value, number)
        self.bar.set_postfix_str(f"best {value:.4g} (trial {number})", refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def print_result(ran: StudyRun | Session, sampler: str, tracking: str | None, warnings: list[str]) -> None:
    """The study's top trials as `lrsearch best` shows them, and where MLflow shows the rest.
    ``ran``: what ran it says of it (``study``, ``target``, ``experiment_id``, ``parent_run_id``,
    ``arrays``): a ``StudyRun`` of ``run``, or a worker's ``Session``."""
    from lrsearch.results.ranking import best_trials, state_counts
    from lrsearch.store.urls import tracking_uri
    from lrsearch.track.links import links, trial_link

    study, target, experiment_id, parent_run_id, arrays = (
        ran.study,
        ran.target,
        ran.experiment_id,
        ran.parent_run_id,
        ran.arrays,
    )

    uri = tracking_uri(tracking)
    rows = [{**r, "mlflow": trial_link(uri, experiment_id, r["mlflow_run_id"])} for r in best_trials(study, 5)]
    print(f"study {study.study_name!r}: {count(len(study.trials), 'trial')} ({state_counts(study)}), target {target}")
    if arrays is not None:
        print(array_line(arrays, sampler))
    if rows:
        copies = ["copies"] if any("copies" in r for r in rows) else []  # population-based training
        print(format_rows(rows, "table", [*TRIAL_COLUMNS, *copies]))
    print("\n".join(links(uri, experiment_id, parent_run_id)))
    model = StudyRecord.from_attrs(study.user_attrs).model
    if model:
        print(model_line(model.uri, model.trial, model.version))
    warn(warnings)


def array_line(use: ArrayUse, sampler: str) -> str:
    """How many trials trained at once, and why (``service.session.ArrayUse``)."""
    from lrsearch.choices.sampling import FIRST_ARRAY, SAMPLERS, TRIALS_PER_MEMBER

    together = f"{use.most}" if use.first == use.most else f"{use.first}, growing to {use.most},"
    if sampler == "pbt":
        capped = f"; memory allows {use.size}" if use.size < int(use.wanted) else ""
        why = f"a population of {use.wanted}, [pbt].population{capped}"
    elif use.wanted != "auto":
        capped = f"; memory allows {use.size}" if use.size < int(use.wanted) else ""
        why = f"array {use.wanted} asked for{capped}"
    elif use.size == 1:
        why = "auto: larger arrays train no faster a trial here"
    else:
        why = f"auto: arrays of {use.size} train fastest a trial on this machine"
        if SAMPLERS[sampler].learns and use.first < use.size:
            why += (
                f"; {sampler} learns from finished trials, so its arrays start at {FIRST_ARRAY} and grow "
                f"to 1/{TRIALS_PER_MEMBER} of the finished trials"
            )
    on = f" on {use.device}" if use.device is not None else ""
    return f"trials trained together: {together} at a time{on} ({why})"


def model_line(uri: str, trial: int, version: str | None = None) -> str:
    """Where a study's registered model is, and how to use it (`run`'s summary, `best`)."""
    made = f"version {version}: trial {trial}" if version is not None else f"trial {trial}"
    return f"model: {uri} ({made}; mlflow.pyfunc.load_model or mlflow models serve -m, with MLFLOW_TRACKING_URI set)"


def warn(lines: list[str]) -> None:
    """Warnings on stderr, each also told to the `run` that started this worker process, if any."""
    from lrsearch.service.launch import tell_parent

    for line in lines:
        print(f"{WARNING_PREFIX}{line}", file=sys.stderr)
        tell_parent("warning", line)
