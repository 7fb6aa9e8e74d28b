"""Trial arrays: what training K trials of a study at once (one Lightning fit, stacked weights)
buys, from the bare training loop to whole studies, against the same work one trial at a time.

1. Training only: the default problem (blobs, MLP width 50, batch 32: the defaults of
   ``parse_config``), pruner none, 50 epochs. ``fit_array`` with K = 1, 4, 8, 16, 32
   ``Member``s (SGD, momentum 0.9, each its own lr, log-spaced 0.003 to 0.03, and seed;
   every member must train all its epochs), in this process: seconds per trial = the fit's
   wall time / K, against trial_overhead.py's bare PyTorch loop training one trial (same
   network, steps and per-epoch validation) measured beside it.
2. Whole studies: 64 trials x 50 epochs of the default problem, TPE (seed 1) over
   studies/search.toml's [params], median pruning. `lrsearch run FILE --array 1` and
   `--array auto` as whole processes (start to exit, the end-of-study report included),
   each in a fresh temporary folder (its cwd: ./lrsearch-data, embedded SQLite).
   Then two `lrsearch worker --array 1` (or `--array auto`) processes, started and warmed
   first (a 2-trial study), serve the same study: timed from launching `lrsearch submit` to
   the study's state "done" (lrsearch.service.queue.status polled in this process every 0.2 s,
   what `status --format json` prints), on SQLite and in server mode (a scratch PostgreSQL
   database for Optuna and `lrsearch server` on it for MLflow, both given to the processes
   through LRSEARCH_STORAGE and MLFLOW_TRACKING_URI, never their command lines).
3. Medium data: a CSV of 20,000 rows x 20 features (scikit-learn make_blobs, 3 classes,
   cluster_std 5) written to the temporary folder, width 128, batch 128, 16 trials x 20
   epochs, TPE + median pruning: `run --array 1` against `--array auto`, as in 2.
4. Time to a good answer: studies/search.toml (TPE over optimizer, lr, momentum and
   schedule, median pruning) with ``--array 1`` and ``auto``, in this process through
   ``lrsearch.service.launch.run_study`` with room for up to 160 trials (4 x the file's
   40), stopped (the worker's StopFlag, as a Ctrl-C would) by a trial callback once a
   COMPLETE trial reaches 0.840 val/acc (the five classic grids' best,
   bench/search_efficiency.py). Time: from the study's first trial's start (its stored
   ``datetime_start``: the auto probe, which comes before it, is shown in part 5) to that
   trial's ``datetime_complete``. Epochs: those trained by trials finished by then, and an
   upper bound counting every trial started by then in full (an array's members still in
   flight). Medians over seeds 1..5. An untimed 2-trial run_study first takes this
   process's first-call costs (lazy imports, caches), here and in 5.
5. Per-trial cost outside training, ``--array 1`` and ``--array 16``, SQLite and server
   mode: the study of 2 run in this process by ``run_study``; (its wall time - training) / trials,
   where training is the time inside the worker's ``fit_array`` calls less the time spent
   in the array host's ``boundary`` (telling Optuna, handing the MLflow records over,
   claiming refills), which runs inside the fit. The auto probe's fits count as
   outside training (shown apart); pruning reports, which run on a helper thread during the
   fit, count as training where the fit waits for them. Also shown: the same per trial
   between the first fit's start and the last fit's end, which leaves out the once-a-study
   costs (opening the study and its MLflow experiment and parent run, the probe, the
   final drain of MLflow records and closing the parent run).

Every part prints a Markdown table of medians over ``--repeats`` (fresh stores each time),
with the machine at the top. ``--quick`` proves the script runs: tiny sizes, 1 repeat, one
seed; its numbers mean nothing for the targets.

6. Time to a good answer on real data: scikit-learn's digits (1,797 handwritten digits, 8 x 8
   pixels: 64 features, 10 classes, shipped with scikit-learn) written as a CSV, standardized,
   studies/search.toml's search with a hidden layer of 128, until a trial reaches 0.98 val/acc
   (the best of a 40-trial TPE study here: 0.983), as in 4.

    python bench/arrays.py [--parts 1,2,3,4,5,6] [--repeats 3] [--quick] [--pg ADMIN_URL]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
GRIDS_BEST = 0.840  # the five classic grid studies' best val/acc (bench/search_efficiency.py)
KS = (1, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Sizes:
    train_epochs: int = 50  # part 1
    study_trials: int = 64  # parts 2 and 5
    study_epochs: int = 50
    csv_rows: int = 20_000  # part 3
    csv_trials: int = 16
    csv_epochs: int = 20
    seeds: int = 5  # part 4
    max_trials: int = 160


QUICK = Sizes(
    train_epochs=5, study_trials=16, study_epochs=5, csv_rows=4_000, csv_trials=8, csv_epochs=3, seeds=1, max_trials=64
)


# -- output -------------------------------------------------------------------------------


def machine() -> str:
    import torch

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread in this process "
        f"(and in every lrsearch process: LRSEARCH_TORCH_THREADS unset), torch {torch.__version__}; "
        f"load average at start {load}"
    )


def table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    print(f"\n### {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
    sys.stdout.flush()


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- study files, stores and processes ----------------------------------------------------


def search_params() -> dict[str, Any]:
    """studies/search.toml's [params]: the search space of every TPE study here."""
    with (STUDIES / "search.toml").open("rb") as f:
        return tomllib.load(f)["params"]


def study_file(path: Path, name: str, trials: int, epochs: int, **tables: dict[str, Any]) -> Path:
    """A study file of the default problem (``tables`` override it), TPE seed 1, median pruning,
    written as lrsearch writes a submitted study's."""
    from lrsearch.config import parse_config, to_toml_text

    raw = {
        "study": {"name": name, "sampler": "tpe", "seed": 1, "pruner": "median", "trials": trials},
        "train": {"epochs": epochs, **tables.pop("train", {})},
        "params": search_params(),
        **tables,
    }
    path.write_text(to_toml_text(parse_config(raw, str(path))))
    return path


def clean_env(**stores: str) -> dict[str, str]:
    """This environment for an lrsearch process: this worktree first on its path, no store
    settings but ``stores`` (LRSEARCH_STORAGE, MLFLOW_TRACKING_URI)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LRSEARCH_STORAGE", "MLFLOW_TRACKING_URI", "LRSEARCH_DATA", "LRSEARCH_TORCH_THREADS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **stores}


def lrsearch(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    """An lrsearch command, to its exit; its stderr's tail in the error if it fails."""
    log = cwd / "stderr.log"
    with log.open("a") as err:
        code = subprocess.run(
            [sys.executable, "-m", "lrsearch.cli", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            check=False,
        ).returncode
    if code:
        raise RuntimeError(f"lrsearch {' '.join(args)}: exit {code}: {log.read_text()[-2000:]}")


def sqlite_stores(folder: Path) -> tuple[str, str]:
    return f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"


def study_facts(storage: str, tracking: str, name: str) -> tuple[str, int]:
    """The array size the study's parent run records (tag ``array.size``; with several
    workers, the last one's) and the epochs its trials trained."""
    import mlflow
    import optuna

    from lrsearch.core import attrs
    from lrsearch.store.storage import open_storage

    store = open_storage(storage)
    try:
        study = optuna.load_study(study_name=name, storage=store)
        epochs = sum(t.user_attrs.get(attrs.EPOCHS_TRAINED, 0) for t in study.get_trials(deepcopy=False))
        parent = study.user_attrs.get(attrs.PARENT_RUN)
    finally:
        store.close()
    size = mlflow.MlflowClient(tracking).get_run(parent).data.tags.get("array.size", "?") if parent else "?"
    return size, epochs


class Server:
    """Server mode for the parts that want it: a scratch PostgreSQL database and an
    `lrsearch server` on it, started on first use and kept until the end."""

    def __init__(self, admin: str, folder: Path, stack: contextlib.ExitStack) -> None:
        self.admin, self.folder, self.stack = admin, folder, stack
        self.stores: tuple[str, str] | None = None
        self.tried = False

    def get(self) -> tuple[str, str] | None:
        from scratch import lrsearch_server, scratch_database

        if not self.tried:
            self.tried = True
            url = self.stack.enter_context(scratch_database(self.admin))
            if url is not None:
                self.folder.mkdir(exist_ok=True)
                self.stores = url, self.stack.enter_context(lrsearch_server(url, self.folder))
        if self.stores is None:
            print("\n(server mode skipped: no PostgreSQL answers at the --pg URL)")
        return self.stores


# -- 1. training only ---------------------------------------------------------------------


def part_training(sizes: Sizes, repeats: int) -> None:
    from trial_overhead import HP, bare_loop

    from lrsearch.choices.data import load_data
    from lrsearch.config import parse_config
    from lrsearch.fit.member import Member
    from lrsearch.fit.training import fit_array

    cfg = parse_config(
        {"study": {"name": "arrays", "pruner": "none"}, "train": {"epochs": sizes.train_epochs}}, "bench"
    )
    data = load_data(cfg.data)

    def array(k: int) -> float:
        members = [
            Member(str(i), {**HP, "lr": 0.003 * 10 ** (i / max(1, k - 1))}, i, cfg.train.epochs) for i in range(k)
        ]
        start = time.perf_counter()
        fit_array(cfg, data, members)
        seconds = time.perf_counter() - start
        assert all(m.result.epochs == cfg.train.epochs for m in members), "a member left early"
        return seconds / k

    def bare() -> float:
        start = time.perf_counter()
        bare_loop(cfg, data)
        return time.perf_counter() - start

    array(2), bare()  # warm-up: first-call imports and caches
    times: dict[Any, list[float]] = {k: [] for k in ("bare", *KS)}
    for _ in range(repeats):  # interleaved: a load that changes affects every row alike
        times["bare"].append(bare())
        for k in KS:
            times[k].append(array(k))
    base = median(times["bare"])
    rows = [["bare PyTorch loop (1 trial)", median(times["bare"]), "1.00", ""]]
    for k in KS:
        ratio = median(times[k]) / base
        rows.append(
            [f"K = {k}", median(times[k]), f"{ratio:.2f}", f"<= 0.20: {verdict(ratio <= 0.2)}" if k == 16 else ""]
        )
    table(
        f"1. Training only: default problem, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, width "
        f"{cfg.model.hidden[0]}, pruner none; median of {repeats}",
        ["K", "s per trial", "x bare loop", "target"],
        rows,
    )


# -- 2. and 3.: whole studies as processes ------------------------------------------------


def timed_run(file: Path, folder: Path, array: str, report: bool = False) -> tuple[float, str, int]:
    """`lrsearch run FILE --array A` (``--no-report`` unless ``report``) in a fresh folder
    (its ./lrsearch-data): (seconds start to exit, array size, epochs trained)."""
    folder.mkdir()
    start = time.perf_counter()
    lrsearch(["run", str(file), "--array", array, *([] if report else ["--no-report"])], folder, clean_env())
    seconds = time.perf_counter() - start
    name = _name_in(file)
    return (seconds, *study_facts(*sqlite_stores(folder / "lrsearch-data"), name))


def _name_in(file: Path) -> str:
    with file.open("rb") as f:
        return tomllib.load(f)["study"]["name"]


@contextlib.contextmanager
def warm_workers(folder: Path, array: str, stores: tuple[str, str], count: int = 2) -> Iterator[dict[str, str]]:
    """``count`` `lrsearch worker --array A` processes on ``stores``, warmed by a 2-trial
    study (imports, store connections, the first fit) before the caller submits; yields the
    environment that reaches their stores."""
    from service import wait_done

    env = clean_env(LRSEARCH_STORAGE=stores[0], MLFLOW_TRACKING_URI=stores[1])
    folder.mkdir(exist_ok=True)
    warm = study_file(folder / f"warm-{array}.toml", f"warm-{array}-{os.getpid()}-{time.monotonic_ns()}", 2, 2)
    lrsearch(["submit", str(warm)], folder, env)
    log = (folder / f"workers-{array}.log").open("a")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lrsearch.cli", "worker", "--array", array, "--max-idle", "600"],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        for _ in range(count)
    ]
    try:
        wait_done([_name_in(warm)], *stores, timeout=600)
        yield env
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        log.close()


def submit_to_done(file: Path, folder: Path, env: dict[str, str], stores: tuple[str, str]) -> tuple[float, str, int]:
    from service import wait_done

    start = time.perf_counter()
    lrsearch(["submit", str(file)], folder, env)
    wait_done([_name_in(file)], *stores, timeout=3600)
    seconds = time.perf_counter() - start
    return (seconds, *study_facts(*stores, _name_in(file)))


Measured = dict[str, list[tuple[float, str, int]]]  # array ("1", "auto") -> (seconds, size, epochs) per repeat


def speedup_row(label: str, got: Measured, target: float | None, also: str = "") -> list[Any]:
    one, auto = (median([s for s, _, _ in got[a]]) for a in ("1", "auto"))
    sizes = "/".join(sorted({size for _, size, _ in got["auto"]}))
    epochs = f"{median([e for _, _, e in got['1']]):.0f} / {median([e for _, _, e in got['auto']]):.0f}"
    goal = "" if target is None else f">= {target:g}x: {verdict(one / auto >= target)}"
    return [label, one, auto, f"{one / auto:.2f}x", sizes, epochs, goal + also]


SPEEDUP_HEADERS = ["setup", "K=1 s", "auto s", "speed-up", "auto K", "epochs K=1 / auto", "target"]


def part_studies(sizes: Sizes, repeats: int, folder: Path, server: Server) -> None:
    trials, epochs = sizes.study_trials, sizes.study_epochs
    rows = []
    got: Measured = {"1": [], "auto": []}
    for i in range(repeats):
        for array in got:
            file = study_file(folder / f"run-{array}-{i}.toml", f"arrays-run-{i}", trials, epochs)
            got[array].append(timed_run(file, folder / f"run-{array}-{i}", array, report=True))
    rows.append(speedup_row("`run` with its report, SQLite", got, 2.5))

    def served(label: str, stores: Callable[[Path], tuple[str, str] | None], target: float) -> None:
        got = {"1": [], "auto": []}
        for array in got:
            where = folder / f"svc-{label}-{array}"
            where.mkdir()
            reach = stores(where)
            if reach is None:
                return
            with warm_workers(where, array, reach) as env:
                for i in range(repeats):
                    file = study_file(where / f"study-{i}.toml", f"arrays-svc-{array}-{i}", trials, epochs)
                    got[array].append(submit_to_done(file, where, env, reach))
        rows.append(speedup_row(f"two warm workers, {label}", got, target))

    served("SQLite", sqlite_stores, 3.5)
    served("server mode", lambda where: server.get(), 3.0)
    table(
        f"2. Whole studies: {trials} trials x {epochs} epochs, default problem, TPE + median pruning; "
        f"seconds start to exit (`run`, its report included) or submit to done (workers); median of {repeats}",
        SPEEDUP_HEADERS,
        rows,
    )


def part_medium(sizes: Sizes, repeats: int, folder: Path) -> None:
    import numpy as np
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=sizes.csv_rows, n_features=20, centers=3, cluster_std=5.0, random_state=0)
    csv = folder / "medium.csv"
    np.savetxt(
        csv,
        np.column_stack([x, y]),
        delimiter=",",
        fmt=["%.5f"] * 20 + ["%d"],
        comments="",
        header=",".join([*(f"f{j}" for j in range(20)), "label"]),
    )
    got: Measured = {"1": [], "auto": []}
    for i in range(repeats):
        for array in got:
            file = study_file(
                folder / f"medium-{array}-{i}.toml",
                f"arrays-medium-{i}",
                sizes.csv_trials,
                sizes.csv_epochs,
                data={"source": "csv", "path": str(csv), "label": "label"},
                model={"hidden": [128]},
                train={"batch_size": 128},
            )
            got[array].append(timed_run(file, folder / f"medium-{array}-{i}", array))
    one, auto = (median([s for s, _, _ in got[a]]) for a in ("1", "auto"))
    table(
        f"3. Medium data: CSV {sizes.csv_rows:,} rows x 20 features, 3 classes, width 128, batch 128, "
        f"{sizes.csv_trials} trials x {sizes.csv_epochs} epochs, TPE + median pruning; `run --no-report`, SQLite; "
        f"median of {repeats}",
        SPEEDUP_HEADERS,
        [speedup_row("`run`, SQLite", got, 2.0, f"; auto <= 1.05x K=1's time: {verdict(auto <= 1.05 * one)}")],
    )


# -- 4. search quality per second ---------------------------------------------------------


def part_search(sizes: Sizes, folder: Path) -> None:
    from lrsearch.config import load_config

    time_to_answer(
        sizes,
        folder,
        load_config(STUDIES / "search.toml"),
        GRIDS_BEST,
        f"4. Time to a good answer: studies/search.toml (TPE, median pruning, <= {sizes.max_trials} "
        f"trials) until a trial reaches val/acc {GRIDS_BEST}, from the study's first trial; in this "
        f"process, SQLite; median over seeds 1..{sizes.seeds}",
        target=3.0,
    )


DIGITS_GOOD = 0.98  # of the 899 validation digits: the best of a 40-trial TPE study here was 0.983


def part_real_data(sizes: Sizes, folder: Path) -> None:
    import tomllib

    import numpy as np
    from sklearn.datasets import load_digits

    from lrsearch.config import parse_config

    x, y = load_digits(return_X_y=True)
    csv = folder / "digits.csv"
    np.savetxt(
        csv,
        np.column_stack([x, y]),
        delimiter=",",
        fmt=["%g"] * x.shape[1] + ["%d"],
        comments="",
        header=",".join([*(f"p{j}" for j in range(x.shape[1])), "label"]),
    )
    raw = tomllib.loads((STUDIES / "search.toml").read_text())
    raw["study"]["name"] = "digits"
    raw["data"] = {"source": "csv", "path": str(csv), "label": "label", "val_fraction": 0.5, "scale": "standard"}
    raw["model"]["hidden"] = [128]
    time_to_answer(
        sizes,
        folder,
        parse_config(raw, "digits.toml"),
        DIGITS_GOOD,
        f"6. Time to a good answer on real data: scikit-learn's digits (1,797 images of 8 x 8 "
        f"pixels: 64 features, 10 classes) as a CSV, studies/search.toml's search with width 128, "
        f"until a trial reaches val/acc {DIGITS_GOOD}, from the study's first trial; in this process, "
        f"SQLite; median over seeds 1..{sizes.seeds}",
        target=2.0,
    )


def time_to_answer(sizes: Sizes, folder: Path, cfg: Any, good: float, title: str, target: float) -> None:
    import optuna
    from optuna.trial import TrialState

    from lrsearch.core import attrs
    from lrsearch.core.stopping import Interrupted, StopFlag
    from lrsearch.service.launch import run_study

    warm_up(folder)
    base = cfg.with_overrides(trials=sizes.max_trials)
    results: dict[str, list[tuple[float, int, int, str] | None]] = {"1": [], "auto": []}
    for seed in range(1, sizes.seeds + 1):
        for array in results:
            name = f"{base.study.name}-{array}-{seed}"
            cfg = dataclasses.replace(base, study=dataclasses.replace(base.study, name=name, seed=seed))
            stores = sqlite_stores(folder / name)
            (folder / name).mkdir()
            stop = StopFlag()

            def reached(study: optuna.Study, trial: optuna.trial.FrozenTrial, stop: StopFlag = stop) -> None:
                if trial.state == TrialState.COMPLETE and trial.value >= good:
                    stop.signum = signal.SIGINT  # as a Ctrl-C: trials in flight stop at their epoch's end

            with contextlib.suppress(Interrupted):
                run_study(
                    cfg,
                    storage=stores[0],
                    tracking=stores[1],
                    callbacks=[reached],
                    stop=stop,
                    array=1 if array == "1" else "auto",
                )
            trials = optuna.load_study(study_name=name, storage=stores[0]).get_trials(deepcopy=False)
            hits = sorted(
                (t for t in trials if t.state == TrialState.COMPLETE and t.value >= good),
                key=lambda t: t.datetime_complete,
            )
            if not hits:
                results[array].append(None)
                continue
            at = hits[0].datetime_complete
            started = min(t.datetime_start for t in trials if t.datetime_start is not None)
            done = sum(
                t.user_attrs.get(attrs.EPOCHS_TRAINED, 0)
                for t in trials
                if t.datetime_complete is not None and t.datetime_complete <= at
            )
            begun = sum(
                t.user_attrs.get(attrs.EPOCHS_TRAINED, 0)
                for t in trials
                if t.datetime_start is not None and t.datetime_start <= at
            )
            results[array].append(((at - started).total_seconds(), done, begun, study_facts(*stores, name)[0]))
    rows = []
    for array, runs in results.items():
        ok = [r for r in runs if r is not None]
        if not ok:
            rows.append([array, "", f"0/{len(runs)}", "", "", "", ""])
            continue
        rows.append(
            [
                array,
                "/".join(sorted({r[3] for r in ok})),
                f"{len(ok)}/{len(runs)}",
                median([r[0] for r in ok]),
                f"{median([r[1] for r in ok]):.0f}",
                f"{median([r[2] for r in ok]):.0f}",
                "",
            ]
        )
    one, auto = ([r[0] for r in results[a] if r is not None] for a in ("1", "auto"))
    if one and auto:
        ratio = median(one) / median(auto)
        rows.append(["K=1 s / auto s", "", "", f"{ratio:.2f}x", "", "", f">= {target:g}x: {verdict(ratio >= target)}"])
    table(
        title,
        [
            "--array",
            "K",
            "seeds reaching",
            "s to reach",
            "epochs (finished by then)",
            "epochs (incl. in flight, at most)",
            "target",
        ],
        rows,
    )


# -- 5. per-trial cost outside training ---------------------------------------------------


class TrainingClock:
    """Time inside the worker's ``fit_array`` calls (those with a host: the auto probe's are
    not), less the time the fit spends in the host's ``boundary`` (telling Optuna, handing
    the MLflow records over, claiming refills); the auto probe;
    when the first of those fits started and the last ended (perf_counter)."""

    def __init__(self) -> None:
        self.training = 0.0
        self.probe = 0.0
        self.first: float | None = None
        self.last = 0.0

    @contextlib.contextmanager
    def installed(self) -> Iterator[TrainingClock]:
        from lrsearch.fit import training

        fit, choose = training.fit_array, training.choose_array_size

        def timed_fit(cfg, data, members, host=None, stop=None):
            if host is None:
                return fit(cfg, data, members, host, stop)
            inside = [0.0]

            def counted(method: Callable) -> Callable:
                def call(*args: Any, **kwargs: Any) -> Any:
                    start = time.perf_counter()
                    try:
                        return method(*args, **kwargs)
                    finally:
                        inside[0] += time.perf_counter() - start

                return call

            host.boundary = counted(host.boundary)
            start = time.perf_counter()
            self.first = start if self.first is None else self.first
            try:
                return fit(cfg, data, members, host, stop)
            finally:
                self.last = time.perf_counter()
                self.training += self.last - start - inside[0]
                del host.boundary

        def timed_choose(*args: Any, **kwargs: Any) -> int:
            start = time.perf_counter()
            try:
                return choose(*args, **kwargs)
            finally:
                self.probe += time.perf_counter() - start

        # The worker imports both from lrsearch.fit.training when it calls them.
        training.fit_array, training.choose_array_size = timed_fit, timed_choose
        try:
            yield self
        finally:
            training.fit_array, training.choose_array_size = fit, choose


def warm_up(folder: Path) -> None:
    """An untimed 2-trial study in this process: lazy imports and first-call caches."""
    from lrsearch.config import load_config
    from lrsearch.service.launch import run_study

    (folder / "warm-up").mkdir()
    stores = sqlite_stores(folder / "warm-up")
    run_study(
        load_config(study_file(folder / "warm-up.toml", "warm-up", 2, 2)),
        storage=stores[0],
        tracking=stores[1],
        array="auto",
    )


def part_outside(sizes: Sizes, repeats: int, folder: Path, server: Server) -> None:
    from lrsearch.config import load_config
    from lrsearch.service.launch import run_study

    warm_up(folder)
    trials = sizes.study_trials
    rows = []

    def measure(label: str, stores_for: Callable[[str], tuple[str, str] | None]) -> None:
        for array in ("1", "16"):
            runs = []
            for i in range(repeats):
                name = f"outside-{label.split()[0].lower()}-{array}-{i}"
                stores = stores_for(name)
                if stores is None:
                    return
                cfg = load_config(study_file(folder / f"{name}.toml", name, trials, sizes.study_epochs))
                with TrainingClock().installed() as clock:
                    start = time.perf_counter()
                    run_study(cfg, storage=stores[0], tracking=stores[1], array=int(array))
                    wall = time.perf_counter() - start
                assert clock.first is not None
                runs.append(
                    (wall, clock.training, clock.probe, clock.last - clock.first, study_facts(*stores, name)[0])
                )
            wall, training, probe = (median([r[j] for r in runs]) for j in range(3))
            ms = 1000 * median([(w - t) / trials for w, t, *_ in runs])
            between = 1000 * median([(span - t) / trials for _, t, _, span, _ in runs])
            limit = 25 if label == "SQLite" else 50
            goal = f"<= {limit} ms: {verdict(ms <= limit)}" if array == "16" else ""
            rows.append(
                [
                    label,
                    array,
                    "/".join(sorted({r[4] for r in runs})),
                    wall,
                    training,
                    probe,
                    f"{ms:.1f}",
                    f"{between:.1f}",
                    goal,
                ]
            )

    def sqlite(name: str) -> tuple[str, str]:
        (folder / name).mkdir()
        return sqlite_stores(folder / name)

    measure("SQLite", sqlite)
    measure("server mode", lambda name: server.get())
    table(
        f"5. Per-trial cost outside training: {trials} trials x {sizes.study_epochs} epochs, default problem, "
        f"TPE + median pruning, run_study in this process; median of {repeats}",
        [
            "stores",
            "--array",
            "K",
            "wall s",
            "training s",
            "auto probe s",
            "ms/trial outside training",
            "same, first fit to last",
            "target",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="1,2,3,4,5,6", help="comma-separated, of 1 to 6 (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, 1 seed: proves the script runs")
    parser.add_argument(
        "--pg",
        default=os.environ.get("LRSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="admin URL of a PostgreSQL for server mode (skipped if unreachable)",
    )
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    if not parts <= {1, 2, 3, 4, 5, 6}:
        parser.error(f"--parts: expected numbers from 1 to 6, got {args.parts!r}")
    sizes, repeats = (QUICK, 1) if args.quick else (Sizes(), args.repeats)

    import optuna
    import torch

    from lrsearch.fit.training import quiet_lightning
    from lrsearch.track.quiet import quiet_mlflow

    torch.set_num_threads(1)
    quiet_lightning()
    quiet_mlflow()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(machine())
    if args.quick:
        print("--quick: tiny sizes, 1 repeat: the numbers prove the script runs, not the targets")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        os.environ["LRSEARCH_DATA"] = str(folder / "lrsearch-data")  # in-process runs' default stores (unused)
        server = Server(args.pg, folder / "server", stack)
        steps = {
            1: lambda: part_training(sizes, repeats),
            2: lambda: part_studies(sizes, repeats, folder / "studies", server),
            3: lambda: part_medium(sizes, repeats, folder / "medium"),
            4: lambda: part_search(sizes, folder / "search"),
            5: lambda: part_outside(sizes, repeats, folder / "outside", server),
            6: lambda: part_real_data(sizes, folder / "digits"),
        }
        for part in sorted(parts):
            if part in (2, 3, 4, 5, 6):
                (folder / {2: "studies", 3: "medium", 4: "search", 5: "outside", 6: "digits"}[part]).mkdir()
            started = time.perf_counter()
            steps[part]()
            print(f"\n(part {part}: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
