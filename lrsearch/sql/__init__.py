"""The SQL views over Optuna's and MLflow's tables (views.sql), and the read-only database that
answers queries on them."""
