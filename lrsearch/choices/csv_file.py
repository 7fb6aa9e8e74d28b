"""The CSV reader: the file's bytes read once and decoded strictly, parsed by the csv module
a chunk of rows at a time, each chunk's columns converted by NumPy at once. Its mistakes
are reported as `FILE: row N, column 'C': …`, N the line an editor shows (the header is
row 1; blank lines count as lines but are skipped, as csv.DictReader does). Finding the row
means reading the text again, which only a mistake costs."""

from __future__ import annotations

import csv
import gc
import io
import json
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.choices.source_table import Origin, _digest, _Table
from lrsearch.core.errors import UsageError
from lrsearch.core.text import count

if TYPE_CHECKING:
    from _csv import Reader

    import numpy as np

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

    def _reader(self) -> Reader:
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
                    print(f"lrsearch: reading {self.name}: {count(rows, 'row')}…", file=sys.stderr, flush=True)
                    last_shown = time.monotonic()
        finally:
            if enabled:
                gc.enable()
        if not rows:
            raise UsageError(f"{self.name}: no data rows, only the header")
        if len(classes) < 2:
            raise UsageError(
                f"{self.name}: column {_echo(label)}: {count(len(classes), 'class', 'classes')} "
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
                f"{count(len(chunk[i]), 'field')}, expected {width} (the header's)"
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
