"""The model a study registers, as MLflow loads it. MLflow copies this file into the model
(models from code, ``mlflow.models.set_model``), so loading the model needs torch, NumPy,
pandas and MLflow, not lrsearch. It takes a DataFrame of the data's own feature columns
(raw: the training data's scaling is inside) and returns each row's label, as the data
writes it, and the probability of each class (``proba_<label>``)."""

from __future__ import annotations

import mlflow
from mlflow.pyfunc.model import PythonModel, PythonModelContext

# The torch.nn classes lrsearch's networks use (choices/network.py): no other name in a
# network file is looked up.
ACTIVATIONS = ("ReLU", "Tanh", "Sigmoid", "ELU", "LeakyReLU", "GELU")


class StudyNetwork(PythonModel):
    """A trial's MLP: its layers, the features' scaling and the labels of its classes, read
    from the ``network`` artifact (a dictionary of tensors and lists, saved by torch)."""

    # The signature is this model's schema: MLflow's subclass hook would otherwise read
    # predict's type hints as one, and warn that there are none.
    _skip_type_hint_validation = True

    def load_context(self, context: PythonModelContext) -> None:
        import torch

        saved = torch.load(context.artifacts["network"], weights_only=True)
        self.features = list(saved["features"])
        self.classes = list(saved["classes"])
        self.layers = saved["layers"]
        if saved["activation"] not in ACTIVATIONS:
            raise ValueError(f"unknown activation {saved['activation']!r}, expected one of {sorted(ACTIVATIONS)}")
        self.activation = getattr(torch.nn, saved["activation"])()
        self.mean = None if saved["mean"] is None else torch.tensor(saved["mean"], dtype=torch.float64)
        self.std = None if saved["std"] is None else torch.tensor(saved["std"], dtype=torch.float64)

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd
        import torch

        # As training saw them: the file's values as float32, then scaled in float64.
        x = torch.tensor(model_input[self.features].to_numpy(dtype="float64")).float().double()
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        h = x.float()
        with torch.no_grad():
            for i in range(0, len(self.layers), 2):
                h = h @ self.layers[i] + self.layers[i + 1]
                if i + 2 < len(self.layers):
                    h = self.activation(h)
            p = torch.softmax(h, dim=1)
        out = pd.DataFrame({"label": [self.classes[i] for i in p.argmax(dim=1).tolist()]})
        for j, label in enumerate(self.classes):
            out[f"proba_{label}"] = p[:, j].double().numpy()
        return out


mlflow.models.set_model(StudyNetwork())
