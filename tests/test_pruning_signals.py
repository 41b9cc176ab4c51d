"""Signals a trial can report to the pruner instead of its loss (issue 21): a cooled-down fork and averaged weights.
Both must leave the run exactly as it would have been, and the replay must charge a fork's steps."""


import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import FAST, compose_config
from tunelab.sweep.signals import CooldownFork, WeightAverage


class Record(pl.Callback):
    """What the run did: each validation's metrics, the batches it trained on and its weights after each step."""

    def __init__(self):
        self.validations, self.batches, self.weights = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in pl_module.parameters() if p.requires_grad])

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validations.append({"step": trainer.global_step,
                                     **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}})


class RecordedFork(CooldownFork):
    """The fork, recording the first batch each fork trains on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first_batches = []

    def cool_down(self, trainer, pl_module, optimizer, params):
        loader = trainer.datamodule.train_dataloader()
        self.first_batches.append(next(iter(loader))["input_ids"].clone())
        super().cool_down(trainer, pl_module, optimizer, params)


class RecordedAverage(WeightAverage):
    """The average, keeping a copy of what it holds at each validation it validates (step -> tensors)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stored = {}

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step < trainer.max_steps and not trainer.sanity_checking:
            self.stored[trainer.global_step] = [a.clone() for a in self.average]
        super().on_validation_end(trainer, pl_module)


def fit(peft: str, tmp_path, cache, *signals: pl.Callback):
    """A 20-step run of the embedded task, validated every 5 batches of an epoch, built as train.py builds it."""
    from tunelab.data import build_datamodule
    from tunelab.inputs import load_tokenizer
    from tunelab.model import build_model
    from tunelab.modules.base import build_module
    from tunelab.peft import apply_peft

    cfg = compose_config([*FAST, f"peft={peft}", "optim.lr=3e-3"], tmp_path, cache)
    tokenizer = load_tokenizer(cfg.model)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data, tokenizer)
    model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft)
    module = build_module(cfg.module, model, cfg.optim, adapter_only_checkpoints=bool(cfg.peft))
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", max_steps=20, val_check_interval=5, logger=False, num_sanity_val_steps=0,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[*signals, record])
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, record


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_a_run_with_forks_and_averaged_weights_ends_bitwise_as_one_without(peft, tmp_path, dataset_cache):
    plain, plain_trainer, plain_record = fit(peft, tmp_path / "plain", dataset_cache)
    fork, average = RecordedFork(steps=3), RecordedAverage(decay=0.8)
    signalled, signalled_trainer, record = fit(peft, tmp_path / "signals", dataset_cache, fork, average)

    # The signals were taken at each validation before the last step, and are values of their own.
    steps = [v["step"] for v in record.validations]
    assert len(steps) >= 3 and fork.forks == sum(step < 20 for step in steps)
    assert all(sorted(v) == ["step", "val/exact_match", "val/loss", *(["val/loss_cooled", "val/loss_ema"] if v["step"] < 20 else [])]
               for v in record.validations)
    assert all(v["val/loss_cooled"] != v["val/loss"] != v["val/loss_ema"] for v in record.validations if v["step"] < 20)
    # Each fork trained on the batches the run trained on next.
    assert all(torch.equal(first, record.batches[step]) for first, step in zip(fork.first_batches, steps, strict=False))
    # Bitwise the same run: the batches, every step's weights, each validation, the optimizer's state at the end.
    assert all(torch.equal(a, b) for a, b in zip(plain_record.batches, record.batches, strict=True))
    assert all(torch.equal(a, b) for steps in zip(plain_record.weights, record.weights, strict=True) for a, b in zip(*steps))
    assert [{k: v[k] for k in ("step", "val/loss", "val/exact_match")} for v in record.validations] == plain_record.validations
    plain_state, state = plain_trainer.optimizers[0].state_dict(), signalled_trainer.optimizers[0].state_dict()
    assert plain_state["param_groups"] == state["param_groups"]
    assert all(torch.equal(plain_state["state"][i][key], state["state"][i][key])
               for i in plain_state["state"] for key in plain_state["state"][i])
    assert plain_trainer.lr_scheduler_configs[0].scheduler.state_dict() == \
        signalled_trainer.lr_scheduler_configs[0].scheduler.state_dict()

    # The average is the exponential moving average of the weights after each step, from the first step's.
    expected = record.weights[0]
    for weights in record.weights[1:]:
        expected = [0.8 * e + 0.2 * w for e, w in zip(expected, weights)]
    assert all(torch.allclose(a, e, rtol=1e-5, atol=1e-7) for a, e in zip(average.average, expected, strict=True))

    # val/loss_ema is the val/loss Lightning's own validation loop gives the weights the average held at that step.
    ema = {v["step"]: v["val/loss_ema"] for v in record.validations if v["step"] < 20}
    assert sorted(average.stored) == sorted(ema)
    params = [p for p in signalled.parameters() if p.requires_grad]
    for step, stored in average.stored.items():
        with torch.no_grad():
            for param, value in zip(params, stored, strict=True):
                param.copy_(value)
        validator = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        (metrics,) = validator.validate(signalled, datamodule=signalled_trainer.datamodule, verbose=False)
        assert ema[step] == pytest.approx(metrics["val/loss"], rel=1e-5), step


@pytest.mark.parametrize("make, message", [
    (lambda: CooldownFork(steps=0), "steps=0 must be an integer >= 1"),
    (lambda: CooldownFork(shape="cosine"), "shape=cosine is not one of: linear, 1-sqrt"),
    (lambda: WeightAverage(decay=1.0), "decay=1.0 must be within (0, 1)"),
])
def test_bad_signal_settings_are_refused_with_the_key_and_the_range(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value) == message


def test_the_replay_reports_a_signal_before_the_last_validation_and_charges_each_fork(replay):
    curve = {"params": {}, "points": [[10, 5, 0.9], [20, 10, 0.7], [30, 15, 0.6]], "fork_steps": 4,
             "cooled": [[10, 0.8], [20, 0.65]], "ema": [[10, 0.85], [20, 0.68]]}
    # (step, lr_area, value reported, trial-steps spent): a fork of 4 steps at each of the first two validations.
    assert replay.reports(curve, "cooled") == [(10, 5, 0.8, 14), (20, 10, 0.65, 28), (30, 15, 0.6, 38)]
    assert replay.reports(curve, "ema") == [(10, 5, 0.85, 10), (20, 10, 0.68, 20), (30, 15, 0.6, 30)]
    assert replay.reports(curve, "loss") == [(10, 5, 0.9, 10), (20, 10, 0.7, 20), (30, 15, 0.6, 30)]


def test_fewer_trials_are_replayed_as_the_first_trials_of_the_unpruned_sweep(replay):
    # Two curves, lr 1e-4 (objective 0.6) and 3e-2 (objective 0.4); 10 trials of 60 steps; the first 7 cost 70%.
    recorded = {"max_steps": 60, "max_warmup_ratio": 0.2, "curves": [
        {"params": {"optim.lr": lr, "peft.r": 16, "optim.warmup_ratio": 0.1},
         "points": [[step, step / 2, final + (60 - step) / 100] for step in range(10, 61, 10)]}
        for lr, final in ((1e-4, 0.6), (3e-2, 0.4))]}
    results = replay.replay(recorded, samplers=("random",), pruners=("none",), seeds=range(3), n_trials=10)
    space = replay.search_space()
    for seed, run in enumerate(results["random", "first_7"]):
        import optuna

        lrs = [optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed + k)).ask(space).params["optim.lr"]
               for k in range(10)]
        high = [lr > (1e-4 * 3e-2) ** 0.5 for lr in lrs]
        regret = 0.0 if any(high[:7]) or not any(high) else 0.6 / 0.4 - 1
        assert run == {"share": pytest.approx(0.7), "regret": pytest.approx(regret)}


def proposals(pruned_trials: str, seed: int = 0) -> list[float]:
    """x proposed by TPE after good complete trials at low x and pruned trials at high x that reported better values
    still, the way a high-LR trial cooled at a rung reports a loss no complete low-LR trial reaches."""
    import optuna

    from tunelab.sweep.sampling import PrunedAsReported

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study = optuna.create_study()
    for x in (i / 50 for i in range(1, 21)):  # 0.02 ... 0.4
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=space, value=1.0 + x))
    for x in (0.8, 0.84, 0.88):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=space, state=optuna.trial.TrialState.PRUNED,
                                                  intermediate_values={25: 0.5}))
    found = []
    for number in range(10):
        sampler = optuna.samplers.TPESampler(seed=seed + number, n_startup_trials=5)
        study.sampler = PrunedAsReported(sampler) if pruned_trials == "reported" else sampler
        trial = study.ask(space)
        found.append(trial.params["x"])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # keeps the history as it was for the next proposal
    return found


def test_the_sampler_learns_a_pruned_trials_last_report_and_the_study_keeps_it_pruned():
    import optuna

    from tunelab.sweep.sampling import StudyView

    reported, ranked_last = proposals("reported"), proposals("optuna")
    assert sum(x > 0.6 for x in reported) >= 7, reported  # drawn towards the pruned trials that reported best
    assert sum(x > 0.6 for x in ranked_last) <= 3, ranked_last  # Optuna ranks them below every complete trial
    study = optuna.create_study()
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study.add_trial(optuna.trial.create_trial(params={"x": 0.9}, distributions=space, state=optuna.trial.TrialState.PRUNED,
                                              intermediate_values={25: 0.7, 50: 0.5}))
    seen = StudyView(study).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [(t.state, t.value) for t in seen] == [(optuna.trial.TrialState.COMPLETE, 0.5)]  # its last report
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED and study.trials[0].value is None


def test_a_sweep_reports_the_cooled_fork_it_adds_itself_and_logs_it_beside_val_loss(tmp_path, dataset_cache):
    """hydra.sweeper.signal=val/loss_cooled with no fork among the callbacks: each trial adds one, reports its value to
    the pruner at every validation but the last (the last reports the trial's own loss), and MLflow holds it at the
    steps of val/loss."""
    import subprocess
    import sys

    import optuna
    from mlflow.tracking import MlflowClient

    from tests.conftest import ROOT, mlflow_runs, subprocess_env

    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "sweep=lora_search", f"hydra.sweeper.storage={storage}",
         "hydra.sweeper.study_name=test", f"hydra.sweep.dir={tmp_path / 'multirun'}", "hydra.sweeper.n_trials=2",
         "hydra/sweeper/pruner=median", "hydra.sweeper.signal=val/loss_cooled", "hydra.sweeper.fork_steps=2",
         "hydra.sweeper.pruned_trials=reported", "trainer.max_steps=10", "trainer.val_check_interval=5",
         "data.num_examples=200", "callbacks=none", "export=false", "trainer.log_every_n_steps=5"],
        cwd=ROOT, capture_output=True, text=True, env=subprocess_env(tmp_path, dataset_cache, uri), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna.load_study(study_name="test", storage=storage).trials
    _, children = mlflow_runs(uri)
    client = MlflowClient(uri)
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    for trial in trials:
        run_id = by_number[trial.number].info.run_id
        cooled = {m.step: m.value for m in client.get_metric_history(run_id, "val/loss_cooled")}
        loss = {m.step: m.value for m in client.get_metric_history(run_id, "val/loss")}
        assert len(cooled) == 1 and set(cooled) < set(loss), (cooled, loss)  # one fork (step 5), at val/loss's step
        (cooled_step, cooled_value), = cooled.items()
        assert cooled_value != pytest.approx(loss[cooled_step], abs=1e-7)  # a fork that did not train changes nothing
        assert trial.intermediate_values[5] == pytest.approx(cooled_value)  # what the pruner was told
        assert trial.intermediate_values[10] == pytest.approx(max(loss.items())[1])  # the last: its own loss


def test_under_ddp_every_rank_forks_and_the_run_ends_as_one_without_signals(tmp_path, dataset_cache):
    """Two CPU ranks: each forks and validates its share in step (a rank that skipped the fork would hang the other in
    its reduce or end with other weights); the run's validations are those of the same run without signals."""
    import csv

    from tests.conftest import run_train

    common = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "peft=lora", "trainer.max_steps=10",
              "trainer.val_check_interval=5", "data.num_examples=300", "callbacks=none", "export=false", "logger=csv",
              "validate_at_start=false"]
    signals = ["+callbacks.fork._target_=tunelab.sweep.signals.CooldownFork", "+callbacks.fork.steps=2",
               "+callbacks.average._target_=tunelab.sweep.signals.WeightAverage"]

    def validations(run_dir):
        rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
        return {name: {int(r["step"]): float(r[name]) for r in rows if r.get(name)}
                for name in ("val/loss", "val/loss_cooled", "val/loss_ema")}

    run_train(common, tmp_path / "plain", dataset_cache, timeout=300)
    run_train([*common, *signals], tmp_path / "signals", dataset_cache, timeout=300)
    plain, signalled = validations(tmp_path / "plain"), validations(tmp_path / "signals")
    assert len(plain["val/loss"]) == 2 and signalled["val/loss"] == plain["val/loss"]  # bitwise, both validations
    assert set(signalled["val/loss_cooled"]) == set(signalled["val/loss_ema"]) == {min(plain["val/loss"])}
    step = min(plain["val/loss"])
    assert signalled["val/loss_cooled"][step] != plain["val/loss"][step] != signalled["val/loss_ema"][step]
