"""What a study file can choose, one registry per concept (name -> factory, defaults, docs
line), with the study-file section that names it: data sources and [data], the network and
[model], optimizers, schedules, samplers and pruners, the hyperparameters."""
