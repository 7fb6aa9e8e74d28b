"""Optuna's own storage tests, run through lrsearch's storage on SQLite and PostgreSQL.

The tests are Optuna's, taken at test time from the source distribution of the installed
version on the package registry (never copied into this project): its storage suite
(`tests/storages_tests/test_storages.py`, the heartbeat tests), `tests/study_tests/
test_dataframe.py` and `tests/trial_tests/`. A plugin of lrsearch's own
(`tests/optuna_storage/lrsearch_wrap.py`) wraps every RDB storage their fixtures build as
lrsearch opens a store. Every test that Optuna's own storage passes must pass through the
wrapper, but for those that check the storage's class rather than its behaviour (below).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import missing

pytestmark = pytest.mark.slow

SUITE = [
    "tests/storages_tests/test_storages.py",
    "tests/storages_tests/test_heartbeat.py",
    "tests/study_tests/test_dataframe.py",
    "tests/trial_tests",
]
PLUGIN = Path(__file__).parent / "optuna_storage"
# The tests that check the storage's class, not its behaviour: why, and what their failure
# shows (where the class decides, not anywhere else).
_IS_RDB = (
    "asserts isinstance(storage, RDBStorage) first, then reaches into RDBStorage's private methods or engine",
    "isinstance",
)
# SQLite reuses a deleted study's id, and the test expects that of RDBStorage and _CachedStorage
# only (by isinstance): through the wrapper, an RDB storage underneath, the id is reused too, and
# the test asserts 3 distinct ids. (PostgreSQL never reuses one: there it passes.)
_REUSED_ID = ("expects a reused study id only of the classes RDBStorage and _CachedStorage", "== 3")
CLASS_CHECKS = {
    "tests.storages_tests.test_storages::test_get_trials_included_trial_ids": _IS_RDB,
    "tests.storages_tests.test_storages::test_get_trials_trial_id_greater_than": _IS_RDB,
    "tests.storages_tests.test_heartbeat::test_fail_stale_trials[None]": _IS_RDB,
    "tests.storages_tests.test_heartbeat::test_fail_stale_trials[2]": _IS_RDB,
    "tests.storages_tests.test_heartbeat::test_fail_stale_trials_with_race_condition": _IS_RDB,
    "tests.storages_tests.test_heartbeat::test_get_stale_trial_ids": _IS_RDB,
    "tests.storages_tests.test_storages.TestStorage::test_create_new_study_unique_id[sqlite]": _REUSED_ID,
    "tests.storages_tests.test_storages.TestStorage::test_create_new_study_unique_id[cached_sqlite]": _REUSED_ID,
}


@pytest.fixture(scope="module")
def optuna_tests() -> Path:
    """The installed Optuna's test suite, from its source distribution (cached outside the
    project: $LRSEARCH_OPTUNA_TESTS, default ~/.cache/lrsearch/optuna-VERSION)."""
    import optuna

    version = optuna.__version__
    home = Path(os.environ.get("LRSEARCH_OPTUNA_TESTS", Path.home() / ".cache" / "lrsearch" / f"optuna-{version}"))
    if (home / "tests" / "storages_tests").is_dir():
        return home
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"optuna=={version}",
                "-d",
                tmp,
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        archives = list(Path(tmp).glob("optuna-*.tar.gz"))
        if got.returncode != 0 or not archives:
            missing(
                "Optuna's test suite",
                f"pip download of optuna=={version}'s source failed: "
                f"{(got.stderr.strip().splitlines() or ['no archive'])[-1]}",
            )
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        home.mkdir(parents=True, exist_ok=True)
        mine = home / f"tests.{os.getpid()}"  # then renamed: the suite's two workers may both fetch it
        shutil.copytree(Path(tmp) / f"optuna-{version}" / "tests", mine)
        try:
            mine.rename(home / "tests")
        except OSError:  # the other worker's is there
            shutil.rmtree(mine, ignore_errors=True)
    return home


def _run(
    suite: Path, tmp_path: Path, store: str, wrap: bool, pg: str | None, only: list[str] | None = None
) -> dict[str, str | None]:
    """Optuna's tests (``only``: these node ids), each test id -> its failure's message (None
    if it passed)."""
    report = tmp_path / f"{store}-{int(wrap)}.xml"
    env = {
        **os.environ,
        "LRSEARCH_OPTUNA_STORE": store,
        "LRSEARCH_OPTUNA_WRAP": "1" if wrap else "0",
        "PYTHONPATH": os.pathsep.join([str(PLUGIN), os.environ.get("PYTHONPATH", "")]),
        **({"LRSEARCH_OPTUNA_PG": pg} if pg else {}),
    }
    args = only or SUITE
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *args,
            "-p",
            "lrsearch_wrap",
            "-q",
            "-n",
            "0",
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            "--tb=line",
            f"--junitxml={report}",
            "-W",
            "ignore::DeprecationWarning",
        ],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if not report.exists():
        pytest.fail(f"Optuna's tests did not run: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    results: dict[str, str | None] = {}
    for case in ET.parse(report).iter("testcase"):
        if case.find("skipped") is not None:
            continue
        failed = case.find("failure")
        if failed is None:
            failed = case.find("error")
        module, _, cls = case.get("classname", "").partition(".Test")
        name = f"{module}{'.Test' + cls if cls else ''}::{case.get('name')}"
        results[name] = None if failed is None else (failed.get("message") or "") + (failed.text or "")
    return results


def _node(test_id: str) -> str:
    """A test id (``tests.storages_tests.test_storages.TestStorage::name``) as a pytest node id."""
    dotted, _, name = test_id.partition("::")
    parts = dotted.split(".")
    cls = parts.pop() if parts[-1].startswith("Test") else None
    return "/".join(parts) + ".py" + (f"::{cls}" if cls else "") + f"::{name}"


def _check(suite: Path, tmp_path: Path, store: str, pg: str | None) -> None:
    wrapped = _run(suite, tmp_path, store, True, pg)
    assert len(wrapped) >= 300, f"only {len(wrapped)} of Optuna's tests ran"
    failed = {name: message for name, message in wrapped.items() if message is not None}
    for name in failed.keys() & CLASS_CHECKS.keys():  # they fail where the class decides, not elsewhere
        assert CLASS_CHECKS[name][1] in (failed[name] or ""), (name, failed[name])
    others = sorted(failed.keys() - CLASS_CHECKS.keys())
    if others:  # the storage's behaviour: do they pass on Optuna's own storage?
        plain = _run(suite, tmp_path, store, False, pg, [_node(name) for name in others])
        ours = [name for name in others if plain.get(name, "not run") is None]
        assert not ours, "\n".join(f"{name}: {failed[name]}" for name in ours)


# One class per database: the suite's workers take a class each (--dist loadscope), and the two
# runs (about 2 and 5 minutes, mostly Optuna's heartbeat tests waiting) overlap.
class TestOnSQLite:
    def test_optunas_storage_tests_pass_through_lrsearchs_storage(self, optuna_tests, tmp_path):
        _check(optuna_tests, tmp_path, "sqlite", None)


class TestOnPostgreSQL:
    def test_optunas_storage_tests_pass_through_lrsearchs_storage(self, optuna_tests, tmp_path, pg_url):
        _check(optuna_tests, tmp_path, "postgresql", pg_url)
