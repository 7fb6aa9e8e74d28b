"""Data files as a user gets them wrong: `validate`, `submit`, `run` and `lr-find` refuse each
mistake alike (exit 2, one line naming the file, its row and column), before any store
exists; a good file is read once per process."""

from __future__ import annotations

import os

import pytest

from lrsearch.choices import csv_file
from lrsearch.choices.data import check_data, load_data
from lrsearch.config import load_config
from lrsearch.core.errors import UsageError

STUDY = """\
[study]
name = "csv"
trials = 1
pruner = "none"

[data]
source = "csv"
path = "data.csv"
label = "y"
val_fraction = 0.2

[train]
epochs = 1
"""

GOOD = b"x1,x2,y\n1,2,a\n3,4,b\n5,6,a\n7,8,b\n"

# (content, the message after "lrsearch: error: "): rows are the lines an editor shows, the header row 1.
BROKEN = {
    "latin-1 header": (
        "x1,caf\xe9,y\n1,2,a\n3,4,b\n5,6,a\n".encode("latin-1"),
        "data.csv: not UTF-8 text: byte 0xe9 at offset 6 (row 1); save it as UTF-8",
    ),
    "binary": (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "data.csv: not UTF-8 text: byte 0x89 at offset 0 (row 1); save it as UTF-8",
    ),
    "nul byte": (b"x1,x2,y\n1,2,a\n3,\x004,b\n5,6,a\n", "data.csv: not text: byte 0x00 at offset 16 (row 3)"),
    "empty file": (b"", "data.csv: empty file, expected a header line naming the columns, then data rows"),
    "header only": (b"x1,x2,y\n", "data.csv: no data rows, only the header"),
    "unnamed column": (b"x1,,y\n1,2,a\n3,4,b\n5,6,a\n", "data.csv: row 1 (the header): column 2 has no name"),
    "duplicate column": (
        b"x1,x1,y\n1,2,a\n3,4,b\n5,6,a\n",
        "data.csv: row 1 (the header): column 'x1' appears twice (columns 1 and 2)",
    ),
    "broken quoting": (
        b'x1,x2,y\n1,2,a\n"3"4,5,b\n5,6,a\n',
        "data.csv: row 3: broken quoting (',' expected after '\"'); a field with a comma, a quote or "
        "a line break must be wholly in double quotes, its quotes doubled",
    ),
    "unclosed quote": (
        b'x1,x2,y\n1,2,a\n\n3,"4,b\n5,6,a\n',
        "data.csv: row 4: broken quoting (unexpected end of data); a field with a comma, a quote or "
        "a line break must be wholly in double quotes, its quotes doubled",
    ),
    "one field too many": (
        b"x1,x2,y\n1,2,a\n\n3,4,5,b\n5,6,a\n",
        "data.csv: row 4: 4 fields, expected 3 (the header's)",
    ),
    "one field too few": (b"x1,x2,y\n1,2,a\n3,b\n5,6,a\n", "data.csv: row 3: 2 fields, expected 3 (the header's)"),
    "empty feature cell": (
        b"x1,x2,y\n1,2,a\n3,4,b\n5,,a\n",
        "data.csv: row 4, column 'x2': expected a number, got an empty cell",
    ),
    "empty label cell": (
        b"x1,x2,y\n1,2,a\n3,4, \n5,6,a\n",
        "data.csv: row 3, column 'y': expected a class label, got an empty cell",
    ),
    "non-numeric feature": (
        b"x1,x2,y\n1,2,a\n3,4,b\n5,six point " + b"o" * 100 + b",a\n",
        "data.csv: row 4, column 'x2': expected a number, got 'six point " + "o" * 50 + "'…",
    ),
    "nan feature": (
        b"x1,x2,y\n1,2,a\n3,4,b\n5,nan,a\n",
        "data.csv: row 4, column 'x2': expected a finite number, got 'nan'",
    ),
    "inf feature": (
        b"x1,x2,y\n1,2,a\ninf,4,b\n5,6,a\n",
        "data.csv: row 3, column 'x1': expected a finite number, got 'inf'",
    ),
    "-inf feature": (
        b"x1,x2,y\n1,2,a\n3,-inf,b\n5,6,a\n",
        "data.csv: row 3, column 'x2': expected a finite number, got '-inf'",
    ),
    "too large for float32": (
        b"x1,x2,y\n1,2,a\n3,4,b\n5,1e39,a\n",
        "data.csv: row 4, column 'x2': expected a number within float32's range "
        "(±3.4e+38: features are float32), got '1e39'",
    ),
    "no label column": (
        b"x1,x2,label\n1,2,a\n3,4,b\n5,6,a\n",
        "data.csv: row 1 (the header): no column 'y' ([data].label) among the columns 'x1', 'x2', 'label'",
    ),
    "no feature column": (b"y\na\nb\na\n", "data.csv: no feature column besides 'y'"),
    "one class": (b"x1,x2,y\n1,2,a\n3,4,a\n5,6,a\n", "data.csv: column 'y': 1 class ('a'), expected at least 2"),
    "too few rows for the split": (
        b"x1,x2,y\n1,2,a\n3,4,b\n",
        "data.csv: 2 data rows, too few for [data].val_fraction = 0.2 (it leaves none for training or validation)",
    ),
}


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _no_store(tmp_path) -> None:
    assert not [p.name for p in tmp_path.rglob("*.db")]
    assert not (tmp_path / "lrsearch-data").exists()


@pytest.mark.parametrize("command", ["validate", "submit", "run", "lr-find"])
@pytest.mark.parametrize("content, message", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_csv_is_refused_before_any_store(cli, tmp_path, command, content, message):
    (tmp_path / "data.csv").write_bytes(content)
    (tmp_path / "study.toml").write_text(STUDY)
    result = cli(command, "study.toml")
    assert result.returncode == 2 and result.stdout == ""
    assert _one_line_error(result.stderr) == f"lrsearch: error: {message}"
    _no_store(tmp_path)


@pytest.mark.parametrize("command", ["validate", "submit", "run"])
@pytest.mark.parametrize("what", ["a directory", "no such file"])
def test_a_missing_csv_or_a_directory_is_refused(cli, tmp_path, command, what):
    if what == "a directory":
        (tmp_path / "data.csv").mkdir()
    (tmp_path / "study.toml").write_text(STUDY)
    result = cli(command, "study.toml")
    assert result.returncode == 2
    assert _one_line_error(result.stderr) == (
        f"lrsearch: error: study.toml: [data].path: expected an existing CSV "
        f"file, got 'data.csv' ({what}: {tmp_path / 'data.csv'})"
    )
    _no_store(tmp_path)


@pytest.mark.parametrize("content, message", BROKEN.values(), ids=BROKEN.keys())
def test_rows_are_counted_across_chunks(tmp_path, monkeypatch, content, message):
    """The same mistakes, with the file converted a row at a time: the row is still the line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(csv_file, "CHUNK_ROWS", 1)
    (tmp_path / "data.csv").write_bytes(content)
    (tmp_path / "study.toml").write_text(STUDY)
    with pytest.raises(UsageError) as e:
        check_data(load_config("study.toml").data)
    assert str(e.value) == message


def test_a_file_gone_since_the_study_was_read_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_bytes(GOOD)
    (tmp_path / "study.toml").write_text(STUDY)
    cfg = load_config("study.toml")
    (tmp_path / "data.csv").unlink()
    with pytest.raises(UsageError, match=r"^data.csv: no such file \(\[data\].path\)$"):
        check_data(cfg.data)
    (tmp_path / "data.csv").mkdir()
    with pytest.raises(UsageError, match=r"^data.csv: a directory, expected a CSV file \(\[data\].path\)$"):
        check_data(cfg.data)


def test_a_good_csv_validates_and_runs(cli, tmp_path):
    (tmp_path / "data.csv").write_bytes(GOOD)
    (tmp_path / "study.toml").write_text(STUDY)
    good = cli("validate", "study.toml")
    assert good.returncode == 0 and "study.toml: ok" in good.stdout and good.stderr == ""
    ran = cli("run", "study.toml", "--no-report")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("study 'csv': 1 trial (1 COMPLETE), target 1")


def test_what_a_csv_file_becomes(tmp_path, monkeypatch):
    """Spreadsheet habits are fine: a byte-order mark, CRLF line ends, quoted fields, blank
    lines; classes are numbered in their sorted order."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_bytes(
        b'\xef\xbb\xbfx1,"x 2",y\r\n1.5,"2",b\r\n\r\n-3,4e1,"a"\r\n5,6,c\r\n7,8,b\r\n9,10,a\r\n'
    )
    # The file's own values (unscaled): scaling has its tests in test_models.py.
    (tmp_path / "study.toml").write_text(STUDY.replace("val_fraction = 0.2", 'val_fraction = 0.4\nscale = "none"'))
    d = load_data(load_config("study.toml").data)
    rows = sorted(zip(map(tuple, [*d.x_train.tolist(), *d.x_val.tolist()]), [*d.y_train.tolist(), *d.y_val.tolist()]))
    assert rows == [((-3.0, 40.0), 0), ((1.5, 2.0), 1), ((5.0, 6.0), 2), ((7.0, 8.0), 1), ((9.0, 10.0), 0)]
    assert (len(d.x_train), len(d.x_val), d.n_classes) == (3, 2, 3)
    assert str(d.x_train.dtype) == "torch.float32" and str(d.y_train.dtype) == "torch.int64"


def test_the_load_reuses_the_checks_parse_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data.csv"
    path.write_bytes(GOOD)
    (tmp_path / "study.toml").write_text(STUDY.replace("val_fraction = 0.2", 'val_fraction = 0.2\nscale = "none"'))
    cfg = load_config("study.toml").data
    check_data(cfg)
    stat = path.stat()
    path.write_bytes(GOOD.replace(b"1,2", b"9,9"))  # same size: only the modification time tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    def features(d):
        return sorted(map(tuple, [*d.x_train.tolist(), *d.x_val.tolist()]))

    assert (1.0, 2.0) in features(load_data(cfg))  # the check's arrays, not a second read
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert (9.0, 9.0) in features(load_data(cfg))


def test_a_long_read_says_how_far_it_got(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(csv_file, "PROGRESS_EVERY", 0.0)  # a line per chunk, as a slow read shows it
    monkeypatch.setattr(csv_file, "CHUNK_ROWS", 2)
    (tmp_path / "data.csv").write_bytes(GOOD)
    (tmp_path / "study.toml").write_text(STUDY)
    result = cli("validate", "study.toml")
    assert result.returncode == 0
    assert result.stderr.splitlines() == ["lrsearch: reading data.csv: 2 rows…", "lrsearch: reading data.csv: 4 rows…"]
