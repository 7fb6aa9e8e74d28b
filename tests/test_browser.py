"""The MLflow UI served by `lrsearch server`, in headless Chromium: the study's parent run with
its trials nested under it, a trial's `lr` chart, and the parent's report artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, missing, stop_process_group, wait_for_http
from lrsearch.config import load_config
from lrsearch.launch import run_study
from lrsearch.report import write_report

# Worker processes, servers or a browser: seconds each (python -m pytest -m "not slow" leaves them out).
pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# As the machine notes advise: no background connections, which this closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_mlflow_ui_shows_the_study(write_study, tmp_path):
    if not Path(CHROMIUM).exists():
        missing("Chromium", f"no browser at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    try:
        import playwright.sync_api as playwright
    except ImportError:
        missing("Playwright", "pip install -e '.[test]' installs it")
    data = tmp_path / "lrsearch-data"
    tracking = f"sqlite:///{data / 'mlflow.db'}"
    path = write_study()
    cfg = load_config(path).with_overrides(trials=2, epochs=3)
    result = run_study(cfg, storage=f"sqlite:///{data / 'optuna.db'}", tracking=tracking, study_file=path)
    write_report("tiny", storage=f"sqlite:///{data / 'optuna.db'}", tracking=tracking, out=tmp_path / "report")
    child = result.study.trials[0].user_attrs["mlflow_run_id"]

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lrsearch.cli", "server", "--db", tracking, "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True, env={**os.environ, "LRSEARCH_DATA": str(data)})
    base = f"http://127.0.0.1:{port}/#/experiments/{result.experiment_id}"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})

            page.goto(f"{base}/runs?workflowType=machine_learning")
            parent_row = page.locator("[role=row]", has_text="tiny").last
            parent_row.wait_for(timeout=30000)
            assert page.get_by_text("trial-0", exact=True).count() == 0  # nested: hidden until expanded
            parent_row.locator("button[data-component-id*='runnamecellrenderer']").click()
            page.get_by_text("trial-0", exact=True).wait_for(timeout=15000)
            page.get_by_text("trial-1", exact=True).wait_for(timeout=15000)
            page.screenshot(path=str(tmp_path / "runs.png"))

            page.goto(f"{base}/runs/{child}/model-metrics?workflowType=machine_learning")
            page.get_by_placeholder("Search metric charts").fill("lr")
            page.get_by_text("trial-0 (lr)").wait_for(timeout=30000)  # the chart's legend
            page.screenshot(path=str(tmp_path / "lr_chart.png"))

            page.goto(f"{base}/runs/{result.parent_run_id}/artifacts?workflowType=machine_learning")
            page.get_by_text("report", exact=True).wait_for(timeout=30000)
            page.get_by_text("study.toml", exact=True).wait_for(timeout=30000)
            page.screenshot(path=str(tmp_path / "parent_artifacts.png"))
            browser.close()
    finally:
        stop_process_group(server)
    for shot in ("runs.png", "lr_chart.png", "parent_artifacts.png"):
        assert (tmp_path / shot).stat().st_size > 10_000
