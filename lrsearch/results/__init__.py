"""What people read of a study: the one ranking of trials, the report's figures and page, the
runs' descriptions in the MLflow UI, the docs' generated tables."""
