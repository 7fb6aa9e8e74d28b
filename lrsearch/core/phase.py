"""A submitted study's phase: the one rule that ``status``, the ``studies`` SQL view, the
parent run's description and the docs' table of states (docs/service.md) follow (``sql/views.sql``
writes it in SQL; ``tests/test_phase.py`` holds the two together on every state)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# In the order the rule tests them: the first that holds is the study's phase.
PHASES = {
    "done": "its total of COMPLETE + PRUNED trials is reached",
    "cancelled": "`lrsearch cancel`: no new trials; submit it again to resume it",
    "running": "trials are running",
    "unrunnable": "a worker could not run it (its version and the reason are shown); submit the corrected "
    "study to queue it again",
    "interrupted": "its last worker stopped (Ctrl-C, SIGTERM or an error) with trials left; running or "
    "submitting it again, or any `lrsearch worker`, resumes it",
    "queued": "waiting for a worker",
}


def phase(
    *, target: int, finished: int, running: int, cancelled: Any = None, unrunnable: Any = None, interrupted: Any = None
) -> str:
    """The phase of a study with ``finished`` (COMPLETE + PRUNED) of ``target`` trials and
    ``running`` trials RUNNING, given its cancellation, unrunnable and interruption records
    (None when absent)."""
    if finished >= target:
        return "done"
    if cancelled is not None:
        return "cancelled"
    if running > 0:
        return "running"
    if unrunnable is not None:
        return "unrunnable"
    if interrupted is not None:
        return "interrupted"
    return "queued"


def explain(state: str, unrunnable: Any = None, interrupted: Any = None) -> str | None:
    """Why an unrunnable or interrupted study is so, in words, from its record (as stored,
    or as its JSON text from the ``studies`` view); None for the other phases."""
    record = unrunnable if state == "unrunnable" else interrupted if state == "interrupted" else None
    if record is None:
        return None
    record = json.loads(record) if isinstance(record, str) else record
    if dataclasses.is_dataclass(record) and not isinstance(record, type):  # a StudyRecord's (core/study_record.py)
        record = dataclasses.asdict(record)
    if state == "unrunnable":
        return (
            f"lrsearch {record.get('version', '?')} on {record.get('host', '?')} cannot run it: "
            f"{record.get('reason', 'no reason recorded')}"
        )
    return f"stopped by {record.get('signal', 'a signal')} at {record.get('at', '?')}"
