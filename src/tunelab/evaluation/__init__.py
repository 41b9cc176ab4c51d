"""Benchmark evaluation (the `eval` group): EleutherAI's lm-evaluation-harness on the model a run trains, in memory,
after fitting and every N validations, beside its base model, into the run's own MLflow run. The default eval=auto
is resolved by tunelab.config (resolve_auto_evaluation) into eval=tiny's options or none before anything here runs.

local_tasks.py  the tasks tunelab ships (tasks/*.yaml: the embedded task, offline); light enough for tunelab.config
harness.py      lm_eval on a model instance (HFLM), with every rank taking part under DDP and FSDP
results.py      the harness's results as eval/<task>/<metric> metrics, deltas against the base, the base's cache
callback.py     BenchmarkEvaluation, the Lightning callback a run gets from build_evaluation
`eval.py` at the repository root evaluates an export after the fact.
"""
