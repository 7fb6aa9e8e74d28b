"""The study service: the queue (submit, status, cancel), a worker's sessions and loop, one
trial's life, run_study, and the MLflow tracking server."""
