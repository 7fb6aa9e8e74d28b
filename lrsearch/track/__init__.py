"""MLflow: its client API behind one class (tracking.py), the outbox that sends a trial's records in
the background, the tracking process that makes those calls off the training interpreter, and the
study's registered model."""
