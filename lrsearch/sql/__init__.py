"""The SQL views over Optuna's and MLflow's tables (views.sql, installed by schema.py), the
read-only database that answers queries on them (queries.py), and the PostgreSQL role that
may only read them (readers.py)."""
