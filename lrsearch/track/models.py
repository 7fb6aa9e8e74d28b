"""The study's model in MLflow: each trial run keeps its network (``network.pt``, a few
kilobytes), and the best trial's becomes an MLflow model on its run, registered under the
study's name with the alias ``best`` (a new version only when the best trial changed).

The model is a pyfunc (``served_model.py``, models from code): it takes the data's raw
feature columns and returns the data's own labels and the class probabilities, because the
features' scaling and the classes' labels travel inside it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.core.names import MODEL_ALIAS, NETWORK_FILE, model_uri
from lrsearch.core.study_record import ModelRecord

if TYPE_CHECKING:
    import torch
    from mlflow.entities.model_registry import ModelVersion

    from lrsearch.choices.data import Dataset
    from lrsearch.track.process import TrackerLike
    from lrsearch.track.tracking import Tracker

SERVED_MODEL = Path(__file__).with_name("served_model.py")


def network_bytes(data: Dataset, activation: str, weights: Sequence[torch.Tensor]) -> bytes:
    """A trial's network as ``served_model.py`` reads it: its layers (W as [in, out], b as
    [out]), its activation (a ``torch.nn`` class name), and the data's features, classes,
    scaling and a few raw rows (the model's input example). Plain tensors, lists and
    numbers: ``torch.load(..., weights_only=True)`` reads it."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(
        {
            "format": 1,
            "layers": [w if i % 2 == 0 else w.reshape(-1) for i, w in enumerate(weights)],
            "activation": activation,
            "features": list(data.features),
            "classes": list(data.classes),
            "label": data.label,
            "mean": None if data.mean is None else list(data.mean),
            "std": None if data.std is None else list(data.std),
            "example": [list(row) for row in data.example],
        },
        buffer,
    )
    return buffer.getvalue()


@dataclass(frozen=True)
class Registered:
    """A study's model in the registry: its name, the version the alias points at, and the
    trial it came from; ``new`` if this call made that version."""

    name: str
    version: str
    trial: int
    run_id: str
    new: bool

    @property
    def uri(self) -> str:
        return model_uri(self.name)

    def record(self) -> ModelRecord:
        """What the study's attributes keep of it (``StudyRecord.model``)."""
        return ModelRecord(self.name, self.version, self.trial, self.run_id, self.uri)


@dataclass(frozen=True)
class Candidate:
    """A study's best trial, to be its model: its number, its run, its metric and value."""

    trial: int
    run_id: str
    metric: str
    value: float


def register_best(
    tracker: TrackerLike,
    experiment_id: str,
    name: str,
    candidate: Candidate,
    best: Callable[[], Candidate | None],
    lock: AbstractContextManager[Any],
) -> Registered | None:
    """The study's best trial, ``candidate``, as the newest version of registered model
    ``name`` (alias ``best``), unless it already is. The model is logged outside ``lock`` (the
    store lock: it takes seconds); its version is made under it if ``best()`` (the one ranking
    of the study's trials, read again) still gives the candidate: one version per best trial,
    however many processes register at once. Else the model as the registry has it (the
    better trial's registration makes its version), or None."""
    found = tracker.run(registered, name, candidate)
    if found is not None:
        return found
    model_id = tracker.run(log_model, experiment_id, name, candidate)
    with lock:
        if best() != candidate:
            return tracker.run(registered, name)
        return tracker.run(register_version, name, model_id, candidate)


def registered(tracker: Tracker, name: str, candidate: Candidate | None = None) -> Registered | None:
    """Model ``name`` as the registry has it: the version its alias points at (``new``
    False), or None; with ``candidate``, None too unless that version is the candidate's."""
    current = _aliased(tracker, name)
    if current is None or (candidate is not None and current.tags.get("lrsearch.run_id") != candidate.run_id):
        return None
    return Registered(
        name,
        str(current.version),
        int(current.tags.get("lrsearch.trial", -1)),
        current.tags.get("lrsearch.run_id", ""),
        new=False,
    )


def log_model(tracker: Tracker, experiment_id: str, name: str, candidate: Candidate) -> str:
    """The candidate's network as an MLflow model on its run (READY, with its ``network.pt``
    inside), or the one already logged there; its model id. A model whose logging failed
    half-way is marked FAILED, not left PENDING. Slow (a download, building the model, an
    upload): called outside the store lock."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from lrsearch.track.artifacts import artifact_dir

    client = tracker.client
    run = tracker._call(client.get_run, candidate.run_id)
    for output in run.outputs.model_outputs if run.outputs else []:
        if tracker._call(client.get_logged_model, output.model_id).status == LoggedModelStatus.READY:
            return output.model_id
    with artifact_dir() as tmp:
        network = Path(tracker._call(client.download_artifacts, candidate.run_id, NETWORK_FILE, tmp))
        folder = Path(tmp) / "model"
        build_model(network, folder)
        # Once, not retried: a repeated create would make a second model.
        model = client.create_logged_model(
            experiment_id, name="model", source_run_id=candidate.run_id, tags=_tags(name, candidate)
        )
        try:
            tracker._call(client.log_model_artifacts, model.model_id, str(folder))
            tracker._call(client.finalize_logged_model, model.model_id, LoggedModelStatus.READY)
            tracker._call(client.log_outputs, candidate.run_id, [LoggedModelOutput(model.model_id, step=0)])
        except BaseException:
            try:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            except Exception:  # the store is away: it stays PENDING, and a later call logs another
                pass
            raise
    return model.model_id


def register_version(tracker: Tracker, name: str, model_id: str, candidate: Candidate) -> Registered:
    """Logged model ``model_id`` (the candidate's) as a version of registered model ``name``,
    the alias ``best`` on it: a version of that run already made is reused (a registration cut
    short before its alias), else a new one. Under the store lock: one version per best trial."""
    from mlflow.exceptions import MlflowException

    found = registered(tracker, name, candidate)
    if found is not None:
        return found
    client = tracker.client
    try:
        client.create_registered_model(
            name,
            tags={"lrsearch.study": name},
            description=(
                f"The best trial's network of lrsearch study {name}: raw feature columns in, the data's "
                f"label and each class's probability out. Alias `{MODEL_ALIAS}`: the newest best trial."
            ),
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    made = tracker._call(client.search_model_versions, f"name = '{name}' AND run_id = '{candidate.run_id}'")
    if made:
        version = max(made, key=lambda v: int(v.version))
    else:
        model = tracker._call(client.get_logged_model, model_id)
        # Its source the model's artifacts, not models:/ID: for that, MLflow's SQL registry
        # looks the model up through the process's default tracking URI, not this client's.
        version = client.create_model_version(
            name,
            model.artifact_location,
            run_id=candidate.run_id,
            tags=_tags(name, candidate),
            model_id=model_id,
            description=f"Trial {candidate.trial} of study {name}: {candidate.metric} = {candidate.value:.4g}",
        )
    tracker._call(client.set_registered_model_alias, name, MODEL_ALIAS, version.version)
    return Registered(name, str(version.version), candidate.trial, candidate.run_id, new=not made)


def _tags(name: str, candidate: Candidate) -> dict[str, str]:
    """The model's and its version's tags: which study, trial, metric and value, which run."""
    return {
        "lrsearch.study": name,
        "lrsearch.trial": str(candidate.trial),
        "lrsearch.metric": candidate.metric,
        "lrsearch.value": repr(candidate.value),
        "lrsearch.run_id": candidate.run_id,
    }


def _aliased(tracker: Tracker, name: str) -> ModelVersion | None:
    """The version the alias points at, or None (no such model, or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return tracker.client.get_model_version_by_alias(name, MODEL_ALIAS)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def build_model(network: Path, folder: Path) -> None:
    """The pyfunc model of ``network`` in ``folder``: ``served_model.py``, the network file
    as its artifact, a signature (the features as doubles; the label and one probability per
    class) and an input example (raw training rows). Its requirements are this process's
    versions, given rather than inferred (inference loads the model in a new process)."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from lrsearch.choices.data import column_type

    saved = torch.load(network, weights_only=True)
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in saved["features"]]),
        outputs=Schema(
            [
                ColSpec(column_type(saved["classes"][0]), "label"),
                *(ColSpec("double", f"proba_{c}") for c in saved["classes"]),
            ]
        ),
    )
    example = pd.DataFrame(saved["example"], columns=saved["features"])
    requirements = [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"pandas=={pd.__version__}",
        f"numpy=={np.__version__}",
    ]
    with warnings.catch_warnings():  # pandas' deprecations, from MLflow's input-example code: not the user's
        warnings.simplefilter("ignore")
        mlflow.pyfunc.save_model(
            str(folder),
            python_model=str(SERVED_MODEL),
            artifacts={"network": str(network)},
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
        )
