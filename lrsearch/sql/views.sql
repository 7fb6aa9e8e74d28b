-- lrsearch's SQL views over Optuna's tables (schema `optuna`) and MLflow's (schema `mlflow`).
-- One text for PostgreSQL and SQLite: a macro name and its arguments (split by ;;) in
-- braces mark the few dialect-specific expressions, expanded by lrsearch/sql/schema.py;
-- the attr macro gives the key of an Optuna attribute (lrsearch/core/attrs.py).
-- On PostgreSQL the views live in schema `lrsearch`; on SQLite they are TEMP views over the attached `optuna` and `mlflow` files.

-- One row per trial of every study. `value` is NULL unless finite; categorical params are
-- decoded to their labels; typed columns come from the trial's hyperparameters (defaults
-- included) or, for studies lrsearch did not run, from its Optuna params.
{create_view: trials}
SELECT
    s.study_name,
    t.number AS trial_number,
    CAST(t.state AS TEXT) AS state,
    CASE WHEN tv.value_type = 'FINITE' THEN tv.value END AS value,
    lower(CAST(sd.direction AS TEXT)) AS direction,
    -- A member of population-based training: what it ended with (its params: its first draw;
    -- no momentum if it ended with an optimizer that has none).
    CASE WHEN pb.value_json IS NOT NULL THEN {final_text: pb.value_json ;; optimizer}
         ELSE COALESCE({text: hp.value_json ;; optimizer}, {param_text: optimizer}) END AS optimizer,
    CASE WHEN pb.value_json IS NOT NULL THEN {final_number: pb.value_json ;; lr}
         ELSE COALESCE({number: hp.value_json ;; lr}, {param_number: lr}) END AS lr,
    CASE WHEN pb.value_json IS NOT NULL THEN {final_number: pb.value_json ;; momentum}
         ELSE COALESCE({number: hp.value_json ;; momentum}, {param_number: momentum}) END AS momentum,
    COALESCE({text: hp.value_json ;; schedule}, {param_text: schedule}) AS schedule,
    (SELECT {object_agg: p.param_name ;; CASE
                 WHEN {text: p.distribution_json ;; name} = 'CategoricalDistribution'
                     THEN {choice_json: p.distribution_json ;; p.param_value}
                 WHEN {text: p.distribution_json ;; name} = 'IntDistribution'
                     THEN {to_json: CAST(p.param_value AS BIGINT)}
                 ELSE {float_json: p.param_value} END}
       FROM optuna.trial_params p WHERE p.trial_id = t.trial_id) AS params,
    t.datetime_start,
    t.datetime_complete,
    -- Its training time (its share of its array's: results.duration_s), else its wall time.
    COALESCE(CAST({scalar: ts.value_json} AS DOUBLE PRECISION),
             {seconds: t.datetime_start ;; t.datetime_complete}) AS duration_s,
    {seconds: t.datetime_start ;; t.datetime_complete} AS wall_s,
    r.run_uuid AS mlflow_run_id,
    r.status AS mlflow_status,
    {final_metric: val/acc} AS val_acc,
    {final_metric: val/loss} AS val_loss,
    {final_metric: train/loss} AS train_loss,
    -- Population-based training: {"final": its hyperparameters at the end, "exploits": each copy}.
    {json: pb.value_json} AS pbt,
    -- Why it ended PRUNED or FAIL (NULL for a COMPLETE trial), and the epochs it trained.
    {scalar: rs.value_json} AS reason,
    CAST({scalar: ep.value_json} AS INTEGER) AS epochs_trained,
    -- The trial array (one fit) it trained in: the trials that trained together share it.
    {scalar: ay.value_json} AS array_id,
    t.trial_id
FROM optuna.trials t
JOIN optuna.studies s ON s.study_id = t.study_id
LEFT JOIN optuna.study_directions sd ON sd.study_id = t.study_id AND sd.objective = 0
LEFT JOIN optuna.trial_values tv ON tv.trial_id = t.trial_id AND tv.objective = 0
LEFT JOIN optuna.trial_user_attributes hp ON hp.trial_id = t.trial_id AND hp.key = {attr: hyperparameters}
LEFT JOIN optuna.trial_user_attributes ra ON ra.trial_id = t.trial_id AND ra.key = {attr: mlflow_run}
LEFT JOIN optuna.trial_user_attributes ts ON ts.trial_id = t.trial_id AND ts.key = {attr: train_seconds}
LEFT JOIN optuna.trial_user_attributes pb ON pb.trial_id = t.trial_id AND pb.key = {attr: pbt}
LEFT JOIN optuna.trial_user_attributes rs ON rs.trial_id = t.trial_id AND rs.key = {attr: reason}
LEFT JOIN optuna.trial_user_attributes ep ON ep.trial_id = t.trial_id AND ep.key = {attr: epochs_trained}
LEFT JOIN optuna.trial_user_attributes ay ON ay.trial_id = t.trial_id AND ay.key = {attr: array_id}
LEFT JOIN mlflow.runs r ON r.run_uuid = {scalar: ra.value_json};

{trial_lookup}

-- The COMPLETE trials with a finite value of each single-objective study, ranked in the
-- study's own direction: rank 1 is the best, ties broken by trial number.
{create_view: best_trials}
SELECT
    ranked.rank, ranked.study_name, tr.trial_number, tr.state, tr.value, tr.direction,
    tr.optimizer, tr.lr, tr.momentum, tr.schedule, tr.params, tr.datetime_start,
    tr.datetime_complete, tr.duration_s, tr.wall_s, tr.mlflow_run_id, tr.mlflow_status, tr.val_acc,
    tr.val_loss, tr.train_loss, tr.pbt, tr.reason, tr.epochs_trained, tr.array_id, tr.trial_id
FROM (
    SELECT
        t.trial_id,
        s.study_name,
        ROW_NUMBER() OVER (  -- = RANK(): the order is unique (ties go to the earlier trial)
            PARTITION BY s.study_name
            ORDER BY CASE WHEN sd.direction = 'MAXIMIZE' THEN -tv.value ELSE tv.value END, t.number
        ) AS rank
    FROM optuna.studies s
    -- single-objective studies only: a Pareto front has no single ranking
    JOIN (SELECT study_id, MIN(direction) AS direction FROM optuna.study_directions
          GROUP BY study_id HAVING COUNT(*) = 1) sd ON sd.study_id = s.study_id
    JOIN optuna.trials t ON t.study_id = s.study_id
    JOIN optuna.trial_values tv ON tv.trial_id = t.trial_id AND tv.objective = 0
    WHERE t.state = 'COMPLETE' AND tv.value_type = 'FINITE'
) ranked
{join_trial: tr ;; ranked.trial_id};

-- One row per study: its trials by state, its best trial and its MLflow parent run; for a
-- submitted study (`lrsearch submit`, `run`), its total, its state (the rule of
-- lrsearch/core/phase.py: done, cancelled, running, unrunnable, interrupted, queued, the first
-- that holds), why when unrunnable or interrupted, and when it was first submitted; model:
-- the registered best trial's model, {"name", "version", "trial", "run_id", "uri"}. best_*
-- are NULL for multi-objective studies (a Pareto front has no single best).
{create_view: studies}
SELECT
    counted.*,
    CASE WHEN counted.target IS NULL THEN NULL
         WHEN counted.n_complete + counted.n_pruned >= counted.target THEN 'done'
         WHEN counted.cancelled IS NOT NULL THEN 'cancelled'
         WHEN counted.n_running > 0 THEN 'running'
         WHEN counted.unrunnable IS NOT NULL THEN 'unrunnable'
         WHEN counted.interrupted IS NOT NULL THEN 'interrupted'
         ELSE 'queued' END AS state
FROM (
SELECT
    s.study_name,
    lower(CAST(sd.direction AS TEXT)) AS direction,
    (SELECT COUNT(*) FROM optuna.study_directions d WHERE d.study_id = s.study_id) AS n_objectives,
    COUNT(t.trial_id) AS n_trials,
    SUM(CASE WHEN t.state = 'COMPLETE' THEN 1 ELSE 0 END) AS n_complete,
    SUM(CASE WHEN t.state = 'PRUNED' THEN 1 ELSE 0 END) AS n_pruned,
    SUM(CASE WHEN t.state = 'FAIL' THEN 1 ELSE 0 END) AS n_fail,
    SUM(CASE WHEN t.state = 'RUNNING' THEN 1 ELSE 0 END) AS n_running,
    SUM(CASE WHEN t.state = 'WAITING' THEN 1 ELSE 0 END) AS n_waiting,
    b.value AS best_value,
    b.trial_number AS best_trial_number,
    b.params AS best_params,
    {scalar: pa.value_json} AS mlflow_parent_run_id,
    {scalar: ea.value_json} AS mlflow_experiment_id,
    CAST({scalar: ta.value_json} AS INTEGER) AS target,
    {scalar: sa.value_json} AS submitted_at,
    {scalar: ca.value_json} AS cancelled,
    CASE WHEN ua.value_json <> 'null' THEN ua.value_json END AS unrunnable,
    CASE WHEN ia.value_json <> 'null' THEN ia.value_json END AS interrupted,
    CASE WHEN ma.value_json <> 'null' THEN ma.value_json END AS model,
    AVG(CASE WHEN t.state IN ('COMPLETE', 'PRUNED')
             THEN COALESCE(CAST({scalar: ts.value_json} AS DOUBLE PRECISION),
                           {seconds: t.datetime_start ;; t.datetime_complete}) END) AS mean_trial_s
FROM optuna.studies s
LEFT JOIN optuna.study_directions sd ON sd.study_id = s.study_id AND sd.objective = 0
LEFT JOIN optuna.trials t ON t.study_id = s.study_id
LEFT JOIN optuna.trial_user_attributes ts ON ts.trial_id = t.trial_id AND ts.key = {attr: train_seconds}
LEFT JOIN {view: best_trials} b ON b.study_name = s.study_name AND b.rank = 1
LEFT JOIN optuna.study_user_attributes pa ON pa.study_id = s.study_id AND pa.key = {attr: parent_run}
LEFT JOIN optuna.study_user_attributes ea ON ea.study_id = s.study_id AND ea.key = {attr: experiment}
LEFT JOIN optuna.study_user_attributes ta ON ta.study_id = s.study_id AND ta.key = {attr: target}
LEFT JOIN optuna.study_user_attributes sa ON sa.study_id = s.study_id AND sa.key = {attr: submitted_at}
LEFT JOIN optuna.study_user_attributes ca ON ca.study_id = s.study_id AND ca.key = {attr: cancelled}
LEFT JOIN optuna.study_user_attributes ua ON ua.study_id = s.study_id AND ua.key = {attr: unrunnable}
LEFT JOIN optuna.study_user_attributes ia ON ia.study_id = s.study_id AND ia.key = {attr: interrupted}
LEFT JOIN optuna.study_user_attributes ma ON ma.study_id = s.study_id AND ma.key = {attr: model}
GROUP BY s.study_id, s.study_name, sd.direction, b.value, b.trial_number, b.params,
         pa.value_json, ea.value_json, ta.value_json, sa.value_json, ca.value_json, ua.value_json, ia.value_json,
         ma.value_json
) counted;
