"""Datasets as whole tensors: a seeded train/validation split, no per-sample loaders."""

from __future__ import annotations

import csv
import dataclasses
import functools
import gc
import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.core.constraints import MAX_SEED, Interval, Satisfies, declared, int_in
from lrsearch.core.errors import UsageError
from lrsearch.core.registry import Registry

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class Dataset:
    """Train and validation tensors (float32 features, scaled as ``[data].scale`` says;
    int64 class indices), and what a model trained on them needs to take raw rows and give
    the data's own labels: the feature columns' names, the label of each class index, the
    scaling (``mean``/``std`` of the training rows, None when unscaled)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int
    features: tuple[str, ...] = ()
    classes: tuple[Any, ...] = ()  # class index -> the data's label value
    label: str = "label"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    origin: Origin | None = None
    example: tuple[tuple[float, ...], ...] = ()  # a few training rows, raw: a model's input example
    # The training and validation rows as MLflow's datasets record them (see inputs()).
    digests: tuple[str, str] = ("", "")

    @functools.cached_property
    def inputs(self) -> list[dict[str, Any]]:
        """The training and validation data as MLflow records a run's datasets
        (``mlflow.log_input``): name, digest (of the rows: the content's digest and the split),
        source, schema (the features and the label), profile (rows, features, classes), and
        the context, ``training`` or ``validation``. Plain values: tracking.py makes MLflow's."""
        if self.origin is None:
            return []
        label_type = column_type(self.classes[0] if self.classes else "")
        schema = json.dumps(
            {
                "mlflow_colspec": [
                    *({"type": "double", "name": f, "required": True} for f in self.features),
                    {"type": label_type, "name": self.label, "required": True},
                ]
            }
        )
        return [
            {
                "name": self.origin.name,
                "digest": digest,
                "source_type": self.origin.source_type,
                "source": self.origin.source,
                "schema": schema,
                "context": context,
                "profile": json.dumps(
                    {"num_rows": len(y), "num_features": self.n_features, "num_classes": self.n_classes}
                ),
            }
            for context, digest, y in (
                ("training", self.digests[0], self.y_train),
                ("validation", self.digests[1], self.y_val),
            )
        ]

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


@dataclass(frozen=True)
class Origin:
    """Where a dataset came from, as MLflow's datasets record it: a name, a digest of its
    content (the CSV file's bytes, or a built-in source's settings), and its source (the
    file, or the generator and its settings)."""

    name: str
    digest: str
    source_type: str  # "local" (a file) or "code" (a generator)
    source: str  # JSON


def load_data(cfg: DataConfig) -> Dataset:
    """Build the dataset the ``[data]`` table describes, split it with ``cfg.seed`` and
    scale it as ``cfg.scale`` says (fitted on the training rows only)."""
    import numpy as np
    import torch

    table = _split(cfg)
    x, train, val = table.x, table.train, table.val
    mean = std = None
    if scale_of(cfg) == "standard":
        fitted = x[train].astype(np.float64)
        mean = fitted.mean(axis=0)
        std = fitted.std(axis=0)
        std[std == 0] = 1.0  # a constant column stays constant (0), not NaN
        x = ((x - mean) / std).astype(np.float32)
    xt, yt = torch.as_tensor(x), torch.as_tensor(table.y)
    return Dataset(
        xt[train],
        yt[train],
        xt[val],
        yt[val],
        len(table.classes),
        table.features,
        table.classes,
        table.label,
        None if mean is None else tuple(mean.tolist()),
        None if std is None else tuple(std.tolist()),
        table.origin,
        tuple(map(tuple, table.x[train[:5]].astype(np.float64).tolist())),
        (
            _digest(f"{table.origin.digest} {scale_of(cfg)} ".encode() + train.tobytes()),
            _digest(f"{table.origin.digest} {scale_of(cfg)} ".encode() + val.tobytes()),
        ),
    )


def column_type(label: Any) -> str:
    """The type of a label column whose values are like ``label``, as MLflow's schemas name it."""
    return {int: "long", float: "double"}.get(type(label), "string")


def scale_of(cfg: DataConfig) -> str:
    """``[data].scale``, or its default (which the study file's reader resolves): ``standard``
    for a CSV file, ``none`` for a built-in source (scaled by design, and the classic
    experiments did not scale)."""
    return cfg.scale or SOURCES[cfg.source].scale


def check_data(cfg: DataConfig) -> None:
    """The data's mistakes (a CSV file's, a split that leaves no rows), found without torch
    and without generating a built-in source's data: what ``validate``, ``submit`` (so
    ``run``) and ``lr-find`` check before opening any store. A CSV file is read here, once:
    ``load_data`` in this process then reuses its arrays."""
    source = SOURCES[cfg.source]
    _check_split(cfg, len(source.load(cfg).x) if source.rows is None else source.rows(cfg))


def _check_split(cfg: DataConfig, rows: int) -> int:
    """The validation rows of ``rows``; :class:`UsageError` if either side would be empty."""
    n_val = int(round(rows * cfg.val_fraction))
    if n_val < 1 or n_val >= rows:
        if cfg.path is not None:
            raise UsageError(
                f"{_shown(cfg.path)}: {_count(rows, 'data row')}, too few for [data].val_fraction = "
                f"{cfg.val_fraction} (it leaves none for training or validation)"
            )
        raise UsageError(
            f"[data].val_fraction: {cfg.val_fraction} leaves no rows for training or validation out of {rows}"
        )
    return n_val


@dataclass(frozen=True)
class _Table:
    """A source's rows before scaling: features (float32), class indices (int64), the label
    of each index, the features' names, the split, and where the rows came from."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[Any, ...]
    features: tuple[str, ...]
    label: str
    origin: Origin
    train: Any = None
    val: Any = None


def _split(cfg: DataConfig) -> _Table:
    """The source's table, with its training and validation rows."""
    import numpy as np

    table = SOURCES[cfg.source].load(cfg)
    n_val = _check_split(cfg, len(table.x))
    order = np.random.default_rng(cfg.seed).permutation(len(table.x))
    return dataclasses.replace(table, train=order[: len(table.x) - n_val], val=order[len(table.x) - n_val :])


def _generated(cfg: DataConfig, x: np.ndarray, y: np.ndarray, generator: str) -> _Table:
    """A built-in source's table: features ``x0``, ``x1``…, label ``label``, the classes its
    labels (integers), its digest that of its settings."""
    import numpy as np

    classes, codes = np.unique(y, return_inverse=True)
    settings = {k: getattr(cfg, k) for k in SOURCES[cfg.source].keys}
    source = json.dumps({"generator": generator, "settings": settings}, sort_keys=True)
    return _Table(
        np.asarray(x, dtype=np.float32),
        codes.astype(np.int64),
        tuple(classes.tolist()),
        tuple(f"x{i}" for i in range(x.shape[1])),
        "label",
        Origin(cfg.source, _digest(source.encode()), "code", source),
    )


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:12]


def _blobs(cfg: DataConfig) -> _Table:
    from sklearn.datasets import make_blobs

    x, y = make_blobs(
        n_samples=cfg.n_samples,
        centers=cfg.centers,
        n_features=cfg.n_features,
        cluster_std=cfg.cluster_std,
        random_state=cfg.random_state,
    )
    return _generated(cfg, x, y, "sklearn.datasets.make_blobs")


def _moons(cfg: DataConfig) -> _Table:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=cfg.n_samples, noise=cfg.noise, random_state=cfg.random_state)
    return _generated(cfg, x, y, "sklearn.datasets.make_moons")


def _digits(cfg: DataConfig) -> _Table:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    x, y = load_digits(return_X_y=True)
    return _generated(cfg, x / 16.0, y, "sklearn.datasets.load_digits")  # pixels are 0..16


def _csv(cfg: DataConfig) -> _Table:
    """The file's features (float32) and class indices (its labels in sorted order), from the
    last parse in this process while the file's size and modification time are unchanged:
    ``run`` checks it (``submit``) and then trains on it (the worker's session), and a
    million rows take seconds to parse. Nobody writes to these arrays (the split copies)."""
    global _last_csv

    assert cfg.path is not None and cfg.label is not None  # checked by config
    try:
        stat = cfg.path.stat()
    except OSError as e:
        raise _unreadable(cfg.path, e) from None
    key = (cfg.path, stat.st_size, stat.st_mtime_ns, cfg.label)
    if _last_csv is None or _last_csv[0] != key:
        _last_csv = None  # the previous file's arrays go before the next one's are built
        _last_csv = key, _CsvFile(cfg.path).read(cfg.label)
    return _last_csv[1]


_last_csv: tuple[tuple[Any, ...], _Table] | None = None

# The CSV reader: the file's bytes read once and decoded strictly, parsed by the csv module
# a chunk of rows at a time, each chunk's columns converted by NumPy at once. Its mistakes
# are reported as `FILE: row N, column 'C': …`, N the line an editor shows (the header is
# row 1; blank lines count as lines but are skipped, as csv.DictReader does). Finding the row
# means reading the text again, which only a mistake costs.
CHUNK_ROWS = 65_536  # rows converted at a time: the Python strings of one chunk only are alive
PROGRESS_EVERY = 1.0  # seconds: a progress line on stderr this often while reading
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32 (features are float32)
_QUOTING = "a field with a comma, a quote or a line break must be wholly in double quotes, its quotes doubled"


class _CsvFile:
    """One CSV file's bytes, checked as text, and the one-line errors that name its rows and columns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = _shown(path)
        try:
            self.data = path.read_bytes()
        except OSError as e:
            raise _unreadable(path, e) from None
        try:
            self.data.decode("utf-8")  # all of it, at once: the offset of a bad byte, before parsing
        except UnicodeDecodeError as e:
            raise self._byte_error(e.start, "not UTF-8 text", "; save it as UTF-8") from None
        if b"\0" in self.data:  # valid UTF-8, yet binary: the csv module would take it as text
            raise self._byte_error(self.data.index(b"\0"), "not text", "")

    def _reader(self) -> Any:
        """The csv module's records, from the bytes (a str of the whole file would take four times their size)."""
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name.
        text = io.TextIOWrapper(io.BytesIO(self.data), encoding="utf-8-sig", newline="")
        return csv.reader(text, strict=True)

    def read(self, label: str) -> _Table:
        import numpy as np

        records = filter(None, self._reader())  # no blank lines
        try:
            names: list[str] = next(records, [])
        except csv.Error as e:
            raise self._refused(e) from None
        if not names:
            raise UsageError(f"{self.name}: empty file, expected a header line naming the columns, then data rows")
        self._check_header(names, label)
        features = [j for j, name in enumerate(names) if name != label]
        target = names.index(label)
        columns: list[list[np.ndarray]] = [[] for _ in features]
        codes: list[np.ndarray] = []
        classes: dict[str, int] = {}  # label -> code, in order of appearance
        rows, last_shown = 0, time.monotonic()
        enabled = gc.isenabled()
        gc.disable()  # the chunks' lists and strings hold no cycles; the collector would triple the time
        try:
            while True:
                try:
                    chunk = list(islice(records, CHUNK_ROWS))
                except csv.Error as e:
                    raise self._refused(e) from None
                if not chunk:
                    break
                self._check_widths(chunk, len(names), rows)
                cells = list(zip(*chunk))
                for out, j in zip(columns, features):
                    out.append(self._numbers(cells[j], names[j], rows))
                codes.append(self._labels(cells[target], label, classes, rows))
                rows += len(chunk)
                if time.monotonic() - last_shown >= PROGRESS_EVERY:
                    print(f"lrsearch: reading {self.name}: {rows:,} rows…", file=sys.stderr, flush=True)
                    last_shown = time.monotonic()
        finally:
            if enabled:
                gc.enable()
        if not rows:
            raise UsageError(f"{self.name}: no data rows, only the header")
        if len(classes) < 2:
            raise UsageError(
                f"{self.name}: column {_echo(label)}: {_count(len(classes), 'class', 'classes')} "
                f"({', '.join(map(_echo, classes))}), expected at least 2"
            )
        # Classes in sorted order, as np.unique numbered them before: seeded studies keep their indices.
        rank = np.empty(len(classes), dtype=np.int64)
        rank[[classes[c] for c in sorted(classes)]] = np.arange(len(classes))
        x = np.stack([np.concatenate(c) for c in columns], axis=1)
        origin = Origin(self.path.name, _digest(self.data), "local", json.dumps({"uri": self.path.as_uri()}))
        return _Table(
            x,
            rank[np.concatenate(codes)],
            _label_values(sorted(classes)),
            tuple(names[j] for j in features),
            label,
            origin,
        )

    def _refused(self, e: csv.Error) -> UsageError:
        """The csv module's refusal, at the line its record starts on."""
        line = next(line for line, fields in self._lines() if fields is None)
        return UsageError(f"{self.name}: row {line}: broken quoting ({e}); {_QUOTING}")

    def _check_header(self, names: list[str], label: str) -> None:
        seen: dict[str, int] = {}
        for i, name in enumerate(names, 1):
            if not name.strip():
                raise self._header_error(f"column {i} has no name")
            if name in seen:
                raise self._header_error(f"column {_echo(name)} appears twice (columns {seen[name]} and {i})")
            seen[name] = i
        if label not in seen:
            raise self._header_error(f"no column {_echo(label)} ([data].label) among {_names(names)}")
        if len(names) < 2:
            raise UsageError(f"{self.name}: no feature column besides {_echo(label)}")

    def _header_error(self, message: str) -> UsageError:
        return UsageError(f"{self.name}: row {self._line_of(0)} (the header): {message}")

    def _check_widths(self, chunk: list[list[str]], width: int, before: int) -> None:
        if set(map(len, chunk)) != {width}:
            i = next(i for i, fields in enumerate(chunk) if len(fields) != width)
            raise UsageError(
                f"{self.name}: row {self._line_of(before + i + 1)}: "
                f"{_count(len(chunk[i]), 'field')}, expected {width} (the header's)"
            )

    def _numbers(self, cells: tuple[str, ...], name: str, before: int) -> np.ndarray:
        """A feature column's chunk as float32; a cell that is not a finite float32 refused."""
        import numpy as np

        try:
            values = np.array(cells, dtype=np.float64)  # float()'s syntax, for the whole column at once
        except ValueError:
            i = next(i for i, cell in enumerate(cells) if not _is_float(cell))
            raise self._cell_error(before + i, name, cells[i], "a number") from None
        bad = ~(np.abs(values) <= FLOAT32_MAX)  # nan, inf, -inf, and what float32 would turn into inf
        if bad.any():
            i = int(bad.argmax())
            expected = (
                "a finite number"
                if not np.isfinite(values[i])
                else f"a number within float32's range (±{FLOAT32_MAX:.3g}: features are float32)"
            )
            raise self._cell_error(before + i, name, cells[i], expected)
        return values.astype(np.float32)

    def _labels(self, cells: tuple[str, ...], name: str, classes: dict[str, int], before: int) -> np.ndarray:
        """A label column's chunk as codes (``classes``, extended with the labels first seen here)."""
        import numpy as np

        new = set(cells).difference(classes)
        empty = [cells.index(label) for label in new if not label.strip()]
        if empty:
            raise self._cell_error(before + min(empty), name, cells[min(empty)], "a class label")
        for label in new:
            classes[label] = len(classes)
        return np.fromiter(map(classes.__getitem__, cells), dtype=np.int64, count=len(cells))

    def _cell_error(self, index: int, name: str, cell: str, expected: str) -> UsageError:
        """``index``: the data row's, from 0."""
        got = "an empty cell" if not cell.strip() else _echo(cell)
        return UsageError(
            f"{self.name}: row {self._line_of(index + 1)}, column {_echo(name)}: expected {expected}, got {got}"
        )

    def _byte_error(self, offset: int, what: str, hint: str) -> UsageError:
        row = self.data.count(b"\n", 0, offset) + 1
        return UsageError(f"{self.name}: {what}: byte 0x{self.data[offset]:02x} at offset {offset} (row {row}){hint}")

    def _line_of(self, index: int) -> int:
        """The line record ``index`` (the header: 0) starts on."""
        return next(islice((line for line, _ in self._lines()), index, None))

    def _lines(self) -> Iterator[tuple[int, list[str] | None]]:
        """Each record that is not a blank line, with the line it starts on; the csv module's
        refusal as ``(line, None)``, last."""
        reader = self._reader()
        line = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield line, None
                return
            if fields:
                yield line, fields
            line = reader.line_num + 1


def _label_values(labels: list[str]) -> tuple[Any, ...]:
    """A CSV file's class labels as a reader of the file (pandas, say) types the column:
    integers if every label is one, else numbers if every label is one, else text."""
    for kind in (int, float):
        try:
            values = tuple(kind(label) for label in labels)
        except ValueError:
            continue
        if len(set(values)) == len(values):  # "1" and "01" are two classes: then text
            return values
    return tuple(labels)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unreadable(path: Path, e: OSError) -> UsageError:
    if isinstance(e, IsADirectoryError):
        return UsageError(f"{_shown(path)}: a directory, expected a CSV file ([data].path)")
    if isinstance(e, FileNotFoundError):
        return UsageError(f"{_shown(path)}: no such file ([data].path)")
    return UsageError(f"{_shown(path)}: cannot read it: {e.strerror or e}")


def _shown(path: Path) -> str:
    """A data file's path as messages show it: relative to the working folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _echo(value: str, limit: int = 60) -> str:
    """A user's value quoted, cut to a readable length."""
    return repr(value[:limit]) + "…" if len(value) > limit else repr(value)


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(map(_echo, names[:limit]))
    return f"the columns {shown}" + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


@dataclass(frozen=True)
class Source:
    name: str
    doc: str
    load: Callable[[DataConfig], _Table]
    keys: tuple[str, ...] = ()  # the [data] keys it reads, besides val_fraction, seed and scale
    rows: Callable[[DataConfig], int] | None = None  # how many rows, without making them (None: load it)
    scale: str = "none"  # [data].scale's default


SOURCES: Registry[Source] = Registry(
    "data source",
    [
        Source(
            "blobs",
            "scikit-learn's make_blobs: Gaussian clusters (the classic problem)",
            _blobs,
            ("n_samples", "centers", "n_features", "cluster_std", "random_state"),
            lambda cfg: cfg.n_samples,
        ),
        Source(
            "moons",
            "scikit-learn's make_moons: two interleaving half circles",
            _moons,
            ("n_samples", "noise", "random_state"),
            lambda cfg: cfg.n_samples,
        ),
        Source(
            "digits",
            "scikit-learn's 8x8 digits (shipped with it), pixels scaled to [0, 1]",
            _digits,
            rows=lambda cfg: 1797,
        ),
        Source(
            "csv",
            "a UTF-8 CSV file with a header line: `path` (relative to the study file), `label` the "
            "class column, the other columns features (finite numbers, standardized unless `scale = "
            '"none"`)',
            _csv,
            ("path", "label"),
            scale="standard",
        ),
    ],
)


# The [data] section of a study file, beside the sources it names (config.py reads it).
SCALES = ("standard", "none")
MAX_SAMPLES, MAX_FEATURES, MAX_CENTERS = 1_000_000, 1_000, 1_000
MAX_VALUES = 20_000_000  # n_samples x n_features: 160 MB as scikit-learn's float64


@dataclass(frozen=True)
class DataConfig:
    source: str = declared(str, "blobs", choices=SOURCES)
    val_fraction: float = declared(float, 0.5, Interval(float, 0, 1, closed="neither"))
    seed: int = int_in(0, MAX_SEED, 0)  # the train/validation split
    n_samples: int = int_in(4, MAX_SAMPLES, 1000)
    centers: int = int_in(2, MAX_CENTERS, 3)
    n_features: int = int_in(1, MAX_FEATURES, 2)
    cluster_std: float = declared(float, 2.0, Interval(float, 0, None, closed="neither"))
    noise: float = declared(float, 0.2, Interval(float, 0, None))
    random_state: int = int_in(0, MAX_SEED, 2)
    path: Path | None = declared(str, None, Satisfies("a file path", lambda v: bool(v.strip())))
    label: str | None = declared(str, None, Satisfies("a column name", lambda v: bool(v.strip())))
    # Features standardized with the training rows' mean and standard deviation (scikit-learn's
    # StandardScaler), the scaling kept inside the registered model.
    scale: str | None = declared(str, None, choices=SCALES, unset='"standard" for source "csv", else "none"')
