"""The core: errors, the names lrsearch writes to Optuna and MLflow, how a study-file key
declares its constraint, the registries' shape, a study's phase and state, signals."""
