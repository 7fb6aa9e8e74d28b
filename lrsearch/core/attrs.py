"""The keys lrsearch stores in Optuna's study and trial attributes: one home for each name,
read by the worker, the report and the SQL views (``sql/views.sql`` names them through its attr macro)."""

from __future__ import annotations

# Study user attributes.
PARENT_RUN = "mlflow_parent_run_id"  # the study's MLflow parent run
EXPERIMENT = "mlflow_experiment_id"
METRIC = "metric"  # the objective's metric name, e.g. val/acc
# The study service's queue lives in these (see service/queue.py): a submitted study has them all.
CONFIG = "lrsearch_config"  # the whole study configuration: any worker runs it without the file
TARGET = "lrsearch_target"  # the total of COMPLETE + PRUNED trials
PRIORITY = "lrsearch_priority"  # higher first; then the oldest submission
SUBMITTED_AT = "lrsearch_submitted_at"  # ISO 8601, UTC
CANCELLED = "lrsearch_cancelled"  # null, or {"at": ISO 8601, "now": bool}
DONE = "lrsearch_done"  # true once the total is reached and the parent run closed
UNRUNNABLE = "lrsearch_unrunnable"  # null, or {"reason", "version", "host", "at"}: a worker could not run it
INTERRUPTED = "lrsearch_interrupted"  # null, or {"at", "signal"}: its last worker stopped on a signal
MODEL = "lrsearch_model"  # null, or {"name", "version", "trial", "run_id", "uri"}: the registered best trial
LR_RANGE = "lrsearch_lr_range"  # lr = { find = true }: the range test's {low, high, suggestion, optimizer, factor}

# Trial user attributes.
HYPERPARAMETERS = "hyperparameters"  # every hyperparameter the trial trained with, defaults included
MLFLOW_RUN = "mlflow_run_id"  # the trial's MLflow child run
REASON = "reason"  # why a trial ended PRUNED or FAIL
TRACKING_ERROR = "tracking_error"  # why its MLflow record is incomplete
EPOCHS_TRAINED = "epochs_trained"
ARRAY_ID = "array_id"  # the trial array (one fit) it trained in: trials that trained together share it
TRAIN_SECONDS = "train_seconds"
# Population-based training: {"final": the hyperparameters it ended with, "exploits": [{"epoch",
# "source", "reason", "before", "after"}, …]} (its params are its first draw: Optuna's).
PBT = "pbt"

# Trial system attributes.
RETRY_HISTORY = "retry_history"  # Optuna's names, as its RetryFailedTrialCallback records retries
FAILED_TRIAL = "failed_trial"
GRID_ID = "grid_id"  # set by Optuna's GridSampler

# For the SQL views.
SQL_NAMES = {
    "parent_run": PARENT_RUN,
    "experiment": EXPERIMENT,
    "hyperparameters": HYPERPARAMETERS,
    "mlflow_run": MLFLOW_RUN,
    "target": TARGET,
    "submitted_at": SUBMITTED_AT,
    "cancelled": CANCELLED,
    "unrunnable": UNRUNNABLE,
    "interrupted": INTERRUPTED,
    "model": MODEL,
    "train_seconds": TRAIN_SECONDS,
    "pbt": PBT,
    "reason": REASON,
    "epochs_trained": EPOCHS_TRAINED,
    "array_id": ARRAY_ID,
}
