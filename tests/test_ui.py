"""`lrsearch ui` serves the embedded store: experiments, nested runs and artifacts over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from lrsearch.config import load_config
from lrsearch.launch import run_study

# Worker processes, servers or a browser: seconds each (python -m pytest -m "not slow" leaves them out).
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_ui_serves_the_embedded_store(write_study, tmp_path):
    data = tmp_path / "lrsearch-data"
    from conftest import TINY_STUDY

    cfg = load_config(write_study(TINY_STUDY + "\n[tracking]\ntrial_plots = true\n")).with_overrides(trials=1, epochs=2)
    result = run_study(cfg, storage=f"sqlite:///{data / 'optuna.db'}", tracking=f"sqlite:///{data / 'mlflow.db'}")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lrsearch.cli", "ui", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "the MLflow server did not start in 90 s"
                time.sleep(0.5)
        experiment = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny")
        assert experiment["experiment"]["experiment_id"] == result.experiment_id
        # It names each study's trials view at its own port (run's links assume port 5000).
        assert server.stderr.readline().decode() == (
            f"study tiny: {base}/#/experiments/{result.experiment_id}/runs?viewStateShareKey=lrsearch-trials"
            "&workflowType=machine_learning\n")
        child_id = result.study.trials[0].user_attrs["mlflow_run_id"]
        child = _get(f"{base}/api/2.0/mlflow/runs/get?run_id={child_id}")["run"]
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == result.parent_run_id
        files = _get(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={child_id}")["files"]
        assert {f["path"] for f in files} == {"learning_curves.png", "trial_config.json"}
        with urllib.request.urlopen(f"{base}/get-artifact?path=learning_curves.png&run_uuid={child_id}") as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
