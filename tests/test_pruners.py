"""The registry's pruners on real Optuna studies: members of an array judge each other at
the same step (choices/pruners.py), and a study's first array prunes."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from lrsearch.choices.pruners import ArrayHalvingPruner, ArrayHyperbandPruner, PeerPercentilePruner, rung_key


def _running(study: optuna.Study, curves: list[list[float]]) -> list[optuna.trial.Trial]:
    trials = []
    for curve in curves:
        trial = study.ask()
        for step, value in enumerate(curve):
            trial.report(value, step)
        trials.append(trial)
    return trials


def test_the_median_counts_running_and_pruned_peers_at_the_same_step():
    # Six members of a first array, none COMPLETE: Optuna's MedianPruner would prune none.
    study = optuna.create_study(direction="maximize", pruner=PeerPercentilePruner(50.0, n_startup_trials=5))
    trials = _running(
        study, [[0.1, 0.2, 0.3], [0.1, 0.5, 0.6], [0.1, 0.6, 0.7], [0.1, 0.7, 0.8], [0.1, 0.8, 0.9], [0.1, 0.9, 0.95]]
    )
    frozen = [study._storage.get_trial(t._trial_id) for t in trials]
    assert [study.pruner.prune(study, t) for t in frozen] == [True, True, True, False, False, False]
    assert not optuna.pruners.MedianPruner(n_startup_trials=5).prune(study, frozen[0])  # Optuna's: no COMPLETE peer
    # A trial pruned at step 1 still counts at step 2, with its last value (it was behind):
    # without it, the median of the others would rise as the weak ones leave.
    early = _running(study, [[0.1, 0.15]])[0]
    study.tell(early, state=TrialState.PRUNED)
    late, later = _running(study, [[0.1, 0.2, 0.72], [0.1, 0.2, 0.65]])
    assert not study.pruner.prune(study, study._storage.get_trial(late._trial_id))  # median 0.7 (0.75 without it)
    assert study.pruner.prune(study, study._storage.get_trial(later._trial_id))
    # Too few peers at a step: no verdict.
    assert not PeerPercentilePruner(50.0, n_startup_trials=20).prune(study, frozen[0])


def test_successive_halving_ranks_a_rung_with_the_values_recorded_there():
    # Rungs at 1 and 4 epochs (min_resource 1, reduction factor 4): at a rung, a trial goes
    # on only in the top quarter of the values recorded there (its own included).
    study = optuna.create_study(direction="minimize", pruner=ArrayHalvingPruner(1, 4))
    trials = _running(study, [[v] for v in (0.5, 0.1, 0.4, 0.3, 0.2, 0.6, 0.7, 0.8)])
    pruner = study.pruner
    frozen = [study._storage.get_trial(t._trial_id) for t in trials]
    records = [pruner.records(t) for t in frozen]
    assert records[1] == {rung_key(0): 0.1}
    for t, r in zip(frozen, records):  # the array's members record theirs first, then are judged
        study._storage.set_trial_system_attr(t._trial_id, rung_key(0), r[rung_key(0)])
    frozen = [study._storage.get_trial(t._trial_id) for t in trials]
    verdicts = [pruner.judge(study, t, recorded=[rung_key(0)]) for t in frozen]
    assert verdicts == [True, False, True, True, False, True, True, True]  # the best 2 of 8 go on
    assert pruner.rung_resource(1) == 4


def test_hyperband_spreads_trials_over_brackets_as_optunas():
    pruner = ArrayHyperbandPruner(min_resource=1, max_resource=27, reduction_factor=3)
    # Optuna's HyperbandPruner's budgets for these resources (ceil(n * rf**s / (s + 1)),
    # s = n - 1 - bracket): trials are drawn into brackets in these proportions.
    assert pruner.budgets == [27, 12, 6, 4]
    assert [b.rung_resource(0) for b in pruner.brackets] == [1, 3, 9, 27]
    drawn = [pruner.bracket("hb", number) for number in range(4900)]
    shares = [drawn.count(s) / len(drawn) for s in range(4)]
    assert all(abs(share - budget / 49) < 0.03 for share, budget in zip(shares, pruner.budgets)), shares


def test_a_studys_first_array_prunes(stores):
    # Eight trials in one array, half of them with a learning rate too small to learn well:
    # the median pruner stops some at a check, before any trial of the study has completed
    # (Optuna's MedianPruner, which compares COMPLETE trials only, would stop none).
    from lrsearch.config import parse_config
    from lrsearch.service.launch import run_study

    cfg = parse_config(
        {
            "study": {"name": "first", "sampler": "grid", "pruner": "median", "seed": 3, "prune_every": 2},
            "train": {"epochs": 10, "batch_size": 64, "array": 8},
            "params": {
                "optimizer": "sgd",
                "lr": {"choices": [1e-6, 2e-6, 3e-6, 4e-6, 0.05, 0.08, 0.1, 0.2]},
                "momentum": 0.9,
            },
        },
        "first.toml",
    )
    result = run_study(cfg, storage=stores[0], tracking=stores[1])
    trials = result.study.trials
    assert len(trials) == 8 and result.arrays.most == 8
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(pruned) >= 2, [(t.params["lr"], t.state.name) for t in trials]
    first_end = min(t.datetime_complete for t in trials if t.state == TrialState.COMPLETE)
    assert any(t.datetime_complete < first_end for t in pruned)
    assert all(
        t.user_attrs["reason"].startswith("pruned at epoch ")
        and t.user_attrs["reason"].endswith(", worse than the median of the other trials at that epoch")
        for t in pruned
    ), [t.user_attrs for t in pruned]
    assert all(t.user_attrs["epochs_trained"] < 10 for t in pruned)
