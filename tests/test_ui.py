"""`lrsearch ui` serves the embedded store: experiments, nested runs and artifacts over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_for_http

from lrsearch.config import load_config
from lrsearch.service.launch import run_study

# Worker processes, servers or a browser: seconds each (python -m pytest -m "not slow" leaves them out).
pytestmark = pytest.mark.slow


def _outward_address() -> str | None:
    """This machine's address on its network (not loopback), if it has a route out."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outward interface
            return s.getsockname()[0]
    except OSError:
        return None


def _refused(host: str | None, port: int) -> bool:
    if host is None:  # no network beyond loopback: nothing could reach the port
        return True
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return True
    return False


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_ui_serves_the_embedded_store(write_study, tmp_path):
    data = tmp_path / "lrsearch-data"
    from conftest import TINY_STUDY

    cfg = load_config(write_study(TINY_STUDY + "\n[tracking]\ntrial_plots = true\n")).with_overrides(trials=1, epochs=2)
    result = run_study(cfg, storage=f"sqlite:///{data / 'optuna.db'}", tracking=f"sqlite:///{data / 'mlflow.db'}")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lrsearch.cli", "ui", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
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
        # Loopback only, one uvicorn worker, MLflow's job runner off, and a page asked for
        # under another host name (DNS rebinding) refused.
        assert _refused(_outward_address(), port)
        server_cmd = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert server_cmd[server_cmd.index(b"--host") + 1] == b"127.0.0.1"
        assert server_cmd[server_cmd.index(b"--workers") + 1] == b"1"
        uvicorns = subprocess.run(
            ["pgrep", "-P", str(server.pid), "-f", "uvicorn"], capture_output=True, text=True
        ).stdout.split()
        assert len(uvicorns) == 1
        environ = dict(
            line.split(b"=", 1)
            for line in Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
            if b"=" in line
        )
        assert environ[b"MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == b"false"
        foreign = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": f"evil.example:{port}"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(foreign, timeout=10)
        assert refused.value.code == 403
        assert b"Invalid Host header" in refused.value.read()
        # It names each study's trials view at its own port (run's links assume port 5000).
        assert server.stderr.readline().decode() == (
            f"study tiny: {base}/#/experiments/{result.experiment_id}/runs?viewStateShareKey=lrsearch-trials"
            "&workflowType=machine_learning\n"
        )
        child_id = result.study.trials[0].user_attrs["mlflow_run_id"]
        child = _get(f"{base}/api/2.0/mlflow/runs/get?run_id={child_id}")["run"]
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == result.parent_run_id
        files = _get(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={child_id}")["files"]
        assert {f["path"] for f in files} == {"learning_curves.png", "network.pt", "trial_config.json"}
        with urllib.request.urlopen(f"{base}/get-artifact?path=learning_curves.png&run_uuid={child_id}") as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _stop_like_ctrl_c(server: subprocess.Popen) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C; then wait until every
    process in it has ended (the server, its workers, anything copying their output)."""
    os.killpg(server.pid, signal.SIGINT)
    server.wait(timeout=60)
    deadline = time.monotonic() + 60
    while True:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            raise AssertionError("the ui's processes outlived it by 60 s")
        time.sleep(0.2)


def test_ui_prints_its_links_not_the_servers_chatter_unless_verbose(write_study, tmp_path):
    from conftest import TINY_STUDY

    data = tmp_path / "lrsearch-data"
    cfg = load_config(write_study(TINY_STUDY)).with_overrides(trials=1, epochs=2)
    result = run_study(cfg, storage=f"sqlite:///{data / 'optuna.db'}", tracking=f"sqlite:///{data / 'mlflow.db'}")
    shown = {}
    for flags in ((), ("--verbose",)):
        port = free_port()
        out, err = tmp_path / f"out{len(flags)}.txt", tmp_path / f"err{len(flags)}.txt"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            server = subprocess.Popen(
                [sys.executable, "-m", "lrsearch.cli", "ui", "--port", str(port), *flags],
                cwd=tmp_path,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{base}/health", server)
            for path in ("/", "/api/2.0/mlflow/experiments/search?max_results=1", "/health"):
                urllib.request.urlopen(base + path, timeout=10).read()
        finally:
            _stop_like_ctrl_c(server)
        shown[flags] = out.read_text(), err.read_text()
        link = (
            f"study tiny: {base}/#/experiments/{result.experiment_id}/runs?viewStateShareKey=lrsearch-trials"
            "&workflowType=machine_learning"
        )
        assert shown[flags][1].splitlines()[:2] == [
            link,
            f"MLflow UI: {base}/#/experiments?workflowType=machine_learning",
        ]

    quiet_out, quiet_err = shown[()]
    assert quiet_out == ""
    assert '"GET ' not in quiet_err and " INFO " not in quiet_err and "INFO:" not in quiet_err
    assert "Security middleware" not in quiet_err and "Warning" not in quiet_err
    verbose_out, verbose_err = shown[("--verbose",)]
    assert '"GET /api/2.0/mlflow/experiments/search?max_results=1 HTTP/1.1" 200' in verbose_out  # one per request
    assert "Uvicorn running on" in verbose_err and "Security middleware" in verbose_err


def test_ui_on_a_port_in_use_fails_in_one_line(tmp_path, cli_process):
    (tmp_path / "lrsearch-data").mkdir()
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'lrsearch-data' / 'mlflow.db'}").create_experiment("other")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A process of its own: were the check missing, `ui` would exec MLflow's server.
        done = cli_process("ui", "--port", str(port), timeout=120)
    assert done.returncode == 1
    assert done.stderr == (
        f"lrsearch: error: port {port} on 127.0.0.1 is in use (another lrsearch ui or MLflow "
        "server?); stop it or pass --port\n"
    )


def test_ctrl_c_in_a_terminal_ends_the_ui_quietly(write_study, tmp_path):
    """In a real terminal (a pty): the ui's links, then Ctrl-C, then nothing more (uvicorn
    logs the lifespan task's CancelledError as an ERROR traceback: not shown), exit 0."""
    import pty
    import select

    from conftest import TINY_STUDY

    data = tmp_path / "lrsearch-data"
    cfg = load_config(write_study(TINY_STUDY)).with_overrides(trials=1, epochs=2)
    run_study(cfg, storage=f"sqlite:///{data / 'optuna.db'}", tracking=f"sqlite:///{data / 'mlflow.db'}")
    port = free_port()
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the command, in the terminal's foreground
        os.chdir(tmp_path)
        os.execv(sys.executable, [sys.executable, "-m", "lrsearch.cli", "ui", "--port", str(port)])
    shown = b""

    def read(seconds: float) -> None:
        nonlocal shown
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if select.select([terminal], [], [], 0.2)[0]:
                try:
                    chunk = os.read(terminal, 65536)
                except OSError:  # the terminal closed: every process in it has ended
                    return
                if not chunk:
                    return
                shown += chunk

    try:
        deadline = time.monotonic() + 120
        while not _answers(f"http://127.0.0.1:{port}/health"):
            assert time.monotonic() < deadline, shown
            read(0.5)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        read(1)
        os.write(terminal, b"\x03")  # Ctrl-C, as typed
        read(30)
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(terminal)
    text = shown.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "Traceback" not in text and "CancelledError" not in text and "ERROR" not in text, text
    assert f"MLflow UI: http://127.0.0.1:{port}/" in text


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
    except (urllib.error.URLError, OSError):
        return False
    return True


@pytest.mark.parametrize(
    "given, shown",
    [
        # Ctrl-C: uvicorn's ERROR record of the cancelled lifespan task, chained on KeyboardInterrupt.
        (
            b'2026/12/06 10:04:06 ERROR:    Traceback (most recent call last):\n  File "x"\nKeyboardInterrupt\n\n'
            b"During handling of the above exception, another exception occurred:\n\n"
            b"Traceback (most recent call last):\n"
            b'  File "y"\nasyncio.exceptions.CancelledError\nlast words\n',
            b"last words\n",
        ),
        # A real error: shown whole, at once, and what follows it too.
        (
            b'2026/12/06 10:04:06 ERROR:    Traceback (most recent call last):\n  File "x"\nValueError: boom\nnext\n',
            b'2026/12/06 10:04:06 ERROR:    Traceback (most recent call last):\n  File "x"\nValueError: boom\nnext\n',
        ),
        (b"a\n[MLflow] Security middleware enabled\nb", b"a\nb\n"),
    ],
)
def test_the_quiet_uis_filter_drops_the_banner_and_ctrl_c_s_traceback_only(given, shown):
    from lrsearch.service.server import _STDERR_FILTER

    assert (
        subprocess.run([sys.executable, "-c", _STDERR_FILTER], input=given, capture_output=True, timeout=30).stdout
        == shown
    )
