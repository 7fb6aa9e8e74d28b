"""The MLflow UI served by `lrsearch server`, in headless Chromium: the study's parent run
explains the study (outcome, top trials linked to their runs, the report's figures, the
registered model), the Models page shows the best trial's network, its run the datasets it
learned from, a pruned trial's run says why, the trials view ranks the study's trials with their columns, the trials
nest under the parent run, a trial's `lr` chart, and a report image in the artifact viewer.

Screenshots land in the test's folder, and in $LRSEARCH_SCREENSHOTS when set (to look at them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, missing, stop_process_group, wait_for_http

from lrsearch.config import load_config
from lrsearch.core.names import run_path, trials_path
from lrsearch.results.figures import DPI, NOTE_FIGURE_WIDTH, PREVIEW_WIDTH
from lrsearch.results.report import write_report
from lrsearch.service.launch import run_study

# Worker processes, servers or a browser: seconds each (python -m pytest -m "not slow" leaves them out).
pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# As the machine notes advise: no background connections, which this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# A grid of two: lr 0.05 learns (COMPLETE); lr 1e8 diverges at once (PRUNED, with its reason).
STUDY = """\
[study]
name = "tiny"
sampler = "grid"
pruner = "none"
seed = 7

[train]
epochs = 3
batch_size = 64

[params]
optimizer = "sgd"
lr = { choices = [0.05, 1e8] }
momentum = 0.9
"""

# The horizontal gaps, in pixels, between the text of a table row's neighbouring cells (each
# cell's text from its first visible character to its last, spaces excepted).
CELL_GAPS = """row => {
  const extent = cell => {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    let left = Infinity, right = -Infinity;
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const text = node.textContent, first = text.search(/\\S/);
      if (first < 0) continue;
      const range = document.createRange();
      range.setStart(node, first);
      range.setEnd(node, text.length - (text.length - text.trimEnd().length));
      const box = range.getBoundingClientRect();
      left = Math.min(left, box.left);
      right = Math.max(right, box.right);
    }
    return [left, right];
  };
  const cells = [...row.children].map(extent);
  return cells.slice(1).map((cell, i) => cell[0] - cells[i][1]);
}"""
# Whether the description is no wider than the scrolling box that shows it.
FITS_ITS_BOX = """note => {
  let box = note.parentElement;
  while (box && !['auto', 'scroll'].includes(getComputedStyle(box).overflowX)) box = box.parentElement;
  return note.scrollWidth <= box.clientWidth && box.scrollWidth <= box.clientWidth;
}"""


def _playwright():
    """Playwright's sync API, with Chromium there to drive (else the test skips, saying why)."""
    if not Path(CHROMIUM).exists():
        missing("Chromium", f"no browser at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    try:
        import playwright.sync_api as playwright
    except ImportError:
        missing("Playwright", "pip install -e '.[test]' installs it")
    return playwright


@contextlib.contextmanager
def _server(tmp_path: Path, data: Path, tracking: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`lrsearch server` on the tracking store, on a free port: its root URL, once it answers."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lrsearch.cli", "server", "--db", tracking, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "LRSEARCH_DATA": str(data)},
    )
    root = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(f"{root}health", server)
        yield root, server
    finally:
        stop_process_group(server)


def test_mlflow_ui_explains_the_study(write_study, tmp_path):
    playwright = _playwright()
    data = tmp_path / "lrsearch-data"
    storage, tracking = f"sqlite:///{data / 'optuna.db'}", f"sqlite:///{data / 'mlflow.db'}"
    path = write_study(STUDY)
    result = run_study(load_config(path), storage=storage, tracking=tracking, study_file=path)
    write_report("tiny", storage=storage, tracking=tracking, out=tmp_path / "report")
    trials = {t.state.name: t for t in result.study.trials}
    complete, pruned = trials["COMPLETE"], trials["PRUNED"]
    reason = pruned.user_attrs["reason"]
    assert reason.startswith("non-finite train/loss at epoch ")

    exp = result.experiment_id
    shots = tmp_path / "shots"
    shots.mkdir()
    with _server(tmp_path, data, tracking) as (root, server):
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")  # `server` binds loopback too
        assert cmdline[cmdline.index(b"--host") + 1] == b"127.0.0.1"
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            # The UI's default width: a 1280-pixel window. Tall, so that the screenshot holds the
            # whole description.
            context = browser.new_context(viewport={"width": 1280, "height": 2400})
            page = context.new_page()

            # A first visit, as a tracking user needs it (track/ui_app.py): the sidebar's switch on
            # Model training (GenAI's sidebar has "AI Registry" instead), the assistant panel
            # not opened by itself.
            page.goto(root)
            page.get_by_text("Model registry", exact=True).wait_for(timeout=30000)
            page.wait_for_timeout(1000)  # (the panel opens as the page settles, where it does)
            assert page.get_by_placeholder("Ask a question...").count() == 0
            assert page.get_by_text("AI Registry", exact=True).count() == 0

            # The parent run's description: outcome, best trial, top-trial table, figures.
            page.goto(root + run_path(exp, result.parent_run_id))
            page.get_by_text("Show more").click(timeout=30000)  # MLflow folds long descriptions
            note = page.locator("[data-testid=note-editor-preview-content]")
            note.get_by_text("tiny", exact=True).wait_for(timeout=15000)
            text = note.inner_text()
            assert "done · 2 of 2 trials (1 COMPLETE, 1 PRUNED) · maximize val/acc" in text
            assert f"Best val/acc: {complete.value:.4g}, trial {complete.number}" in text
            assert f"Model: models:/tiny@best (version 1, trial {complete.number})" in text
            assert note.locator("table tr").count() == 2  # header + the one COMPLETE trial
            # The page pads no table cell: a gap of its own keeps each cell's text apart.
            for row in range(2):
                gaps = note.locator("table tr").nth(row).evaluate(CELL_GAPS)
                assert len(gaps) == 5 and min(gaps) >= 12, gaps
            images = note.locator("img")
            assert images.count() == 3  # a grid: accuracy per value, optimization history, objective against lr
            images.last.scroll_into_view_if_needed()
            page.wait_for_function(
                f"imgs => imgs.every(i => i.complete && i.naturalWidth == {PREVIEW_WIDTH})",
                arg=images.element_handles(),
                timeout=15000,
            )
            # The whole description within its box: nothing pushed past its right edge.
            assert note.evaluate(FITS_ITS_BOX), "the description is wider than the box that shows it"
            note.screenshot(path=str(shots / "parent_description.png"))
            page.screenshot(path=str(shots / "parent_run.png"))
            with context.expect_page() as opened:  # the table's link opens the trial's run
                note.locator("table").get_by_role("link", name=str(complete.number), exact=True).click()
            child = opened.value
            child.wait_for_url(f"**/runs/{complete.user_attrs['mlflow_run_id']}**", timeout=15000)
            child.get_by_text(f"trial-{complete.number}", exact=True).first.wait_for(timeout=15000)
            child.close()
            # The study's model, one click away: its registered version's page.
            with context.expect_page() as opened:
                note.get_by_role("link", name="models:/tiny@best", exact=True).click()
            model_page = opened.value
            model_page.wait_for_url("**/models/tiny/versions/1**", timeout=15000)
            playwright.expect(model_page.locator("body")).to_contain_text("Version 1", timeout=30000)
            playwright.expect(model_page.locator("body")).to_contain_text(complete.user_attrs["mlflow_run_id"][:8])
            model_page.close()
            page.set_viewport_size({"width": 1500, "height": 1000})  # the tables below: room for every column

            # A pruned trial's run says why on its page.
            page.goto(root + run_path(exp, pruned.user_attrs["mlflow_run_id"]))
            page.get_by_text(f"PRUNED: {reason} · optimizer=sgd, lr=1e+08, momentum=0.9").wait_for(timeout=30000)
            page.screenshot(path=str(shots / "pruned_run.png"))

            # The registered model on the Models page, its newest version aliased best; the trial's
            # run names the model and the datasets it learned from.
            page.goto(root + "#/models")
            row = page.locator("tr, [role=row]", has_text="tiny").last
            row.wait_for(timeout=30000)
            playwright.expect(row).to_contain_text("@ best")
            playwright.expect(row).to_contain_text("Version 1")
            page.wait_for_timeout(1000)  # MLflow's one-time notice about its registry UI would be up by now
            assert page.locator("[role=dialog]").count() == 0
            page.screenshot(path=str(shots / "models.png"))
            page.goto(root + "#/models/tiny")
            playwright.expect(page.locator("body")).to_contain_text(f"lrsearch.trial: {complete.number}", timeout=30000)
            page.goto(root + run_path(exp, complete.user_attrs["mlflow_run_id"]))
            about = page.locator("body")
            playwright.expect(about).to_contain_text("Registered models", timeout=30000)
            page.get_by_text(re.compile(r"^blobs \(\w{12}\)$")).wait_for(timeout=30000)  # name (digest)
            # The first dataset's context, "+1" the other (training, validation).
            assert re.search(r"blobs \(\w{12}\)\n(Training|Validation)\n\+1\n", page.inner_text("body"))
            page.screenshot(path=str(shots / "best_trial_run.png"))

            # The plain runs table (first: the UI keeps the last view's filter): trials nested under
            # the study's run until expanded.
            page.goto(f"{root}#/experiments/{exp}/runs?workflowType=machine_learning")
            parent_row = page.locator("[role=row]", has_text="tiny").last
            parent_row.wait_for(timeout=30000)
            assert page.get_by_text("trial-0", exact=True).count() == 0
            parent_row.locator("button[data-component-id*='runnamecellrenderer']").click()
            page.get_by_text("trial-1", exact=True).wait_for(timeout=15000)
            page.screenshot(path=str(shots / "runs.png"))

            # The trials view: the study's trials flat, COMPLETE first, with state and reason.
            page.close()
            page = context.new_page()
            page.goto(root + trials_path(exp))
            page.wait_for_url("**orderByKey=tags.%60rank_key%60**", timeout=30000)  # the view applied
            page.get_by_text("2 matching runs").wait_for(timeout=30000)
            rows = page.locator("[role=row]", has_text="trial-")  # (each row's other cells: another element)
            playwright.expect(rows.nth(0)).to_contain_text(f"trial-{complete.number}", timeout=15000)
            playwright.expect(rows.nth(1)).to_contain_text(f"trial-{pruned.number}")
            assert page.get_by_role("gridcell", name="PRUNED", exact=True).count() == 1
            for header in ("objective", "val/acc", "lr", "state", "reason"):
                assert page.get_by_role("columnheader", name=header, exact=True).count() >= 1, header
            page.get_by_text(reason).first.wait_for(timeout=15000)
            page.screenshot(path=str(shots / "trials_view.png"))

            # A trial's learning-rate curve, as LearningRateMonitor logged it.
            page.goto(root + run_path(exp, complete.user_attrs["mlflow_run_id"]).replace("?", "/model-metrics?"))
            page.get_by_placeholder("Search metric charts").fill("lr")
            page.get_by_text(f"trial-{complete.number} (lr)").wait_for(timeout=30000)  # the chart's legend
            page.screenshot(path=str(shots / "lr_chart.png"))

            # The report's figures in the parent's artifacts: an image shows in the viewer.
            page.goto(root + run_path(exp, result.parent_run_id).replace("?", "/artifacts?"))
            page.get_by_text("study.toml", exact=True).wait_for(timeout=30000)
            page.get_by_text("report", exact=True).click()
            page.get_by_text("optimization_history.png", exact=True).click()
            # (the viewer shows the file through a blob: URL; the page has no other large image)
            full = round(NOTE_FIGURE_WIDTH * DPI)  # the figure itself, not its preview
            page.wait_for_function(
                f"() => [...document.images].some(i => i.complete && i.naturalWidth == {full})", timeout=30000
            )
            page.screenshot(path=str(shots / "report_artifact.png"))

            # The user's own choice is kept: the defaults fill only what the browser has no value for.
            page.goto(root)
            page.get_by_text("GenAI", exact=True).click()
            page.get_by_text("AI Registry", exact=True).wait_for(timeout=15000)
            page.reload()
            page.get_by_text("AI Registry", exact=True).wait_for(timeout=30000)
            browser.close()
    for shot in shots.iterdir():
        assert shot.stat().st_size > 10_000, shot.name
    if os.environ.get("LRSEARCH_SCREENSHOTS"):
        shutil.copytree(shots, os.environ["LRSEARCH_SCREENSHOTS"], dirs_exist_ok=True)


# Three learning rates that all separate well-spread blobs: the trials tie on val/acc.
TIES = """\
[study]
name = "ties"
sampler = "grid"
pruner = "none"
seed = 7

[data]
cluster_std = 0.3

[train]
epochs = 4

[params]
optimizer = "sgd"
lr = { choices = [0.03, 0.05, 0.08] }
momentum = 0.9
"""


def test_trials_tied_on_the_metric_rank_alike_in_best_the_views_the_description_and_the_ui(write_study, tmp_path):
    """MLflow orders a view by one key, its ties newest first: the trials view orders by each
    run's rank_key, so tied trials show in the one ranking's order, as everywhere else."""
    playwright = _playwright()
    from lrsearch.core.text import fmt
    from lrsearch.results.ranking import ranking
    from lrsearch.sql.queries import best_trials_sql

    data = tmp_path / "lrsearch-data"
    storage, tracking = f"sqlite:///{data / 'optuna.db'}", f"sqlite:///{data / 'mlflow.db'}"
    path = write_study(TIES)
    result = run_study(load_config(path), storage=storage, tracking=tracking, study_file=path)
    values = [t.value for t in result.study.trials]
    assert len(set(values)) < len(values), values  # a tie, or this test shows nothing
    order = [t.number for t in ranking(result.study.trials, "maximize")]
    assert [r["trial_number"] for r in best_trials_sql(storage, tracking, "ties", 10)] == order
    model = result.study.user_attrs["lrsearch_model"]
    assert model["trial"] == order[0]  # the registered model is the top trial's

    with _server(tmp_path, data, tracking) as (root, _):
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1500, "height": 1000}).new_page()
            page.goto(root + run_path(result.experiment_id, result.parent_run_id))
            note = page.locator("[data-testid=note-editor-preview-content]")
            note.get_by_text("ties", exact=True).wait_for(timeout=30000)
            assert (
                note.inner_text()
                .split("Best val/acc: ", 1)[1]
                .startswith(f"{fmt(values[order[0]])}, trial {order[0]}:")
            )
            page.goto(root + trials_path(result.experiment_id))
            page.get_by_text(f"{len(order)} matching runs").wait_for(timeout=30000)
            rows = page.locator("[role=row]", has_text="trial-")
            playwright.expect(rows).to_have_count(len(order), timeout=15000)
            shown = [int(re.search(r"trial-(\d+)", rows.nth(i).inner_text()).group(1)) for i in range(len(order))]
            assert shown == order
            browser.close()
