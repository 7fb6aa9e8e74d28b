"""MLflow: its client API behind one class, and the outbox that sends a trial's records in the background."""
