"""tunelab's pruners (issue 14): the nearest-trial bound that sweep=lora_search uses, schedule-aligned pruning (the
divergence guard, rungs after the longest warm-up, the LR-area clock), their config checks, and the offline replay that
measures pruners on recorded curves."""

import math
import subprocess
import sys

import optuna
import pytest

from tests.conftest import ROOT, subprocess_env
from tunelab.optim import lr_area
from tunelab.sweep.pruning import NearestTrialBoundPruner, ScheduleAlignedPruner, rung_steps

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_with(curves: list[dict[int, float]], pruner=None) -> optuna.Study:
    """An in-memory study whose finished trials reported these {step: loss} curves, ending at their last value."""
    study = optuna.create_study(pruner=pruner or ScheduleAlignedPruner(max_steps=100, max_warmup_ratio=0.2))
    for curve in curves:
        trial = study.ask()
        for step, loss in curve.items():
            trial.report(loss, step)
        study.tell(trial, curve[max(curve)])
    return study


def prunes_at(study: optuna.Study, curve: dict[int, float], trial: optuna.Trial | None = None) -> int | None:
    """Replays one more trial's curve (a new one, or `trial`); the step it was pruned at, or None if it ran to the
    end."""
    trial = trial or study.ask()
    for step, loss in curve.items():
        trial.report(loss, step)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial, curve[max(curve)])
    return None


def test_a_non_finite_loss_is_pruned_at_once_even_during_warmup():
    study = study_with([])

    assert prunes_at(study, {10: 2.0, 20: math.nan}) == 20
    assert prunes_at(study, {10: math.inf}) == 10


def test_a_loss_at_or_above_the_first_validation_is_pruned_at_once_after_the_warmup():
    study = study_with([])  # the longest warm-up ends at step 20 (0.2 x 100)

    assert prunes_at(study, {10: 2.0, 20: 2.0}) == 20
    assert prunes_at(study, {10: 2.0, 20: 1.5, 30: 2.5}) == 30  # not at a rung: the guard does not wait for one
    assert prunes_at(study, {10: 2.0, 20: 1.9, 30: 1.8}) is None  # improving and alone at its rung: goes on


def test_a_flat_loss_during_the_warmup_is_not_pruned():
    study = study_with([])

    # A small LR early in a warm-up may not move the loss yet: only a non-finite one stops the trial there.
    assert prunes_at(study, {5: 2.0, 10: 2.01, 15: 2.0, 20: 1.8}) is None


def test_rungs_start_where_the_longest_warmup_ends():
    assert rung_steps(max_steps=150, max_warmup_ratio=0.2, reduction_factor=2) == [30, 60, 120]
    # A warm-up of W steps covers an LR area of W/2; a full schedule of T steps at least T/2.
    assert rung_steps(max_steps=150, max_warmup_ratio=0.2, reduction_factor=2, clock="lr_area") == [15, 30, 60]
    assert rung_steps(max_steps=100, max_warmup_ratio=0.0, reduction_factor=4) == [1, 4, 16, 64]


def test_no_trial_is_pruned_by_comparison_before_the_first_rung():
    good = {10: 1.0, 20: 0.5, 30: 0.4, 40: 0.3}
    study = study_with([good] * 4)

    # Far worse than every other trial, but still improving: nothing decides before step 20 (rung at 0.2 x 100).
    assert prunes_at(study, {10: 3.0, 19: 2.9}) is None
    assert prunes_at(study, {10: 3.0, 20: 2.9}) == 20


def test_at_a_rung_the_better_half_goes_on_and_the_worse_half_stops():
    study = study_with([{10: 2.0, 20: loss} for loss in (1.0, 2.0 - 1e-3, 1.5)])

    # Four trials at rung 20 (this one included): the best two go on.
    assert prunes_at(study, {10: 2.0, 20: 1.2}) is None   # second best
    assert prunes_at(study, {10: 2.0, 20: 1.6}) == 20     # fourth of five


def test_a_rung_waits_for_n_min_trials():
    study = study_with([{20: 1.0}], ScheduleAlignedPruner(max_steps=100, max_warmup_ratio=0.2, n_min_trials=3))

    assert prunes_at(study, {10: 3.0, 20: 2.9}) is None  # two trials at the rung: too few to decide
    assert prunes_at(study, {10: 3.0, 20: 2.95}) == 20   # three: the worst of them stops (ceil(3/2) = 2 go on)


def test_lr_area_clock_is_monotone_and_counts_steps_at_a_constant_lr():
    areas = [lr_area(step, total_steps=150, warmup=30, min_lr_ratio=0.1) for step in range(151)]

    assert all(b > a for a, b in zip(areas, areas[1:]))
    assert areas[30] == pytest.approx(15.0)  # the warm-up's area: (1 + ... + 30) / 31, half its steps
    # The cosine's 120 steps average (1 + min_lr_ratio) / 2 (its cosines cancel in pairs): 120 x 0.55 = 66 more.
    assert areas[150] == pytest.approx(15.0 + 66.0)
    assert [lr_area(step, 150, warmup=0, min_lr_ratio=1.0) for step in (0, 25, 150)] == [0, 25, 150]


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.pruner.reduction_factor=1", "hydra.sweeper.pruner: reduction_factor=1 must be an integer >= 2"),
    ("hydra.sweeper.pruner.clock=epoch", "hydra.sweeper.pruner: clock=epoch is not one of: step, lr_area"),
    ("hydra.sweeper.pruner.max_warmup_ratio=0.1",
     "hydra.sweeper.pruner.max_warmup_ratio=0.1 is below the longest warm-up of the sweep, optim.warmup_ratio=0.2"),
])
def test_a_bad_schedule_aligned_setting_is_one_error_line(tmp_path, override, message):
    command = [sys.executable, str(ROOT / "train.py"), "-m", "sweep=lora_search", "hydra/sweeper/pruner=schedule_aligned",
               f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
               override]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=subprocess_env(tmp_path, tmp_path / "cache"))

    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"tunelab: error: {message}"), result.stderr[-2000:]
    assert not (tmp_path / "optuna.db").exists()


LR = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}


def lr_study(curves: dict[float, dict[int, float]], direction: str = "minimize", **options) -> optuna.Study:
    """Finished trials at these learning rates, each with its {step: loss} curve; its objective is the last value."""
    study = optuna.create_study(direction=direction, pruner=NearestTrialBoundPruner(**options))
    for lr, curve in curves.items():
        trial = fixed_trial(study, lr)
        for step, loss in curve.items():
            trial.report(loss, step)
        study.tell(trial, curve[max(curve)])
    return study


def fixed_trial(study: optuna.Study, lr: float) -> optuna.Trial:
    study.enqueue_trial({"optim.lr": lr})
    return study.ask(LR)


def prunes_at_lr(study: optuna.Study, lr: float, curve: dict[int, float]) -> int | None:
    return prunes_at(study, curve, fixed_trial(study, lr))


# Under a decaying schedule a high learning rate lags at first and ends best; a low one leads early and stalls.
LOW, HIGH = {25: 0.50, 50: 0.49, 100: 0.48}, {25: 0.60, 50: 0.55, 100: 0.44}
FINISHED = {1e-4: LOW, 2e-4: {25: 0.51, 50: 0.50, 100: 0.49}, 1e-2: HIGH, 3e-4: {25: 0.52, 50: 0.51, 100: 0.50}}


def test_nearest_bound_keeps_a_lagging_high_lr_trial_that_its_neighbour_says_can_still_win():
    study = lr_study(FINISHED)
    lagging = {25: 0.59, 50: 0.54, 100: 0.43}  # at step 50: 0.54 x 0.44 / 0.55 = 0.432, below the best 0.44

    assert prunes_at_lr(study, 1.2e-2, lagging) is None
    median = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=4))
    for trial in study.trials:
        median.add_trial(trial)
    assert prunes_at_lr(median, 1.2e-2, lagging) == 25  # ranked at step 25 it is the worst: the median pruner stops it


def test_nearest_bound_prunes_a_trial_that_could_not_beat_the_best_at_its_neighbours_pace():
    study = lr_study(FINISHED)

    assert prunes_at_lr(study, 1.1e-4, {25: 0.50, 50: 0.49, 100: 0.48}) == 50  # 0.49 x 0.48 / 0.49 = 0.48 > 0.44
    assert prunes_at_lr(study, 1.1e-2, {25: 0.62, 50: 0.57, 100: 0.45}) == 50  # 0.57 x 0.44 / 0.55 = 0.456


def test_nearest_bound_decides_nothing_at_the_first_validation_unless_asked_to():
    # A first validation ranks trials by their schedule more than by their end: the winners lag most there.
    hopeless = {25: 0.62, 50: 0.57, 100: 0.45}

    assert prunes_at_lr(lr_study(FINISHED), 1.1e-2, {25: 0.62}) is None
    assert prunes_at_lr(lr_study(FINISHED, decide_at_first_validation=True), 1.1e-2, hopeless) == 25


def test_nearest_bound_spares_a_trial_catching_up_with_its_neighbour():
    catching_up = {25: 0.70, 50: 0.60, 100: 0.45}  # 0.60 x 0.44 / 0.55 = 0.48, but it fell 14% where HIGH fell 8%

    assert prunes_at_lr(lr_study(FINISHED), 1.1e-2, catching_up) is None
    assert prunes_at_lr(lr_study(FINISHED, spare_catching_up=False), 1.1e-2, catching_up) == 50


def test_nearest_bound_waits_for_n_min_complete_trials_and_prunes_a_non_finite_value_at_once():
    study = lr_study({1e-2: HIGH, 1e-4: LOW}, n_min_trials=3)

    assert prunes_at_lr(study, 1.1e-4, {25: 0.9, 50: 0.9, 100: 0.9}) is None  # two complete trials: no decision yet
    assert prunes_at_lr(study, 1.1e-4, {25: math.nan}) == 25  # even at the first validation
    assert prunes_at_lr(study, 1.1e-4, {25: 0.9, 50: 0.9, 100: 0.9}) == 50  # three complete now


def test_nearest_bound_never_prunes_at_the_last_validation_and_keeps_ties():
    study = lr_study(FINISHED)

    assert prunes_at_lr(study, 1.2e-2, {25: 0.60, 100: 0.47}) is None  # the last validation: it saves nothing
    assert prunes_at_lr(study, 1e-2, HIGH) is None  # the best trial's params again: projected onto the best exactly


def test_nearest_bound_follows_the_study_direction():
    flipped = {lr: {step: 1 - loss for step, loss in curve.items()} for lr, curve in FINISHED.items()}
    study = lr_study(flipped, direction="maximize")

    assert prunes_at_lr(study, 1.2e-2, {25: 0.41, 50: 0.46, 100: 0.57}) is None
    assert prunes_at_lr(study, 1.1e-4, {25: 0.50, 50: 0.51, 100: 0.52}) == 50


def test_lora_search_prunes_with_the_nearest_bound_and_names_a_bad_setting_in_one_line(tmp_path):
    from tests.conftest import compose_config

    cfg = compose_config(["sweep=lora_search"], tmp_path, tmp_path / "cache")
    assert cfg.hydra.sweeper.pruner._target_ == "tunelab.sweep.pruning.NearestTrialBoundPruner"
    command = [sys.executable, str(ROOT / "train.py"), "-m", "sweep=lora_search", "hydra.sweeper.pruner.n_min_trials=0",
               f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=subprocess_env(tmp_path, tmp_path / "cache"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "tunelab: error: hydra.sweeper.pruner: n_min_trials=0 must be an integer >= 1"), result.stderr[-2000:]


def synthetic_curves() -> dict:
    """A recorded-curve set on a grid of the lora_search space: the loss falls faster with the LR up to 3e-3, the rank
    helps a little, and lr 3e-2 diverges after its warm-up."""
    curves = []
    for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2):
        for rank in (4, 8, 16, 32):
            for warmup_ratio in (0.0, 0.1, 0.2):
                warmup, floor = round(warmup_ratio * 60), 0.4 + 0.1 * abs(math.log10(lr / 3e-3)) - 0.005 * math.log2(rank)
                points = []
                for step in range(10, 61, 10):
                    area = lr_area(step, 60, warmup, 0.1)
                    loss = math.nan if lr == 3e-2 and step > warmup else floor + 2.0 * math.exp(-area * lr * 300)
                    points.append([step, area, loss])
                curves.append({"params": {"optim.lr": lr, "peft.r": rank, "optim.warmup_ratio": warmup_ratio},
                               "points": points})
    return {"max_steps": 60, "max_warmup_ratio": 0.2, "curves": curves}


def curve(lr: float, losses: list[float]) -> dict:
    """A recorded curve at this learning rate (rank and warm-up shared by all), validated every 10 of 60 steps."""
    return {"params": {"optim.lr": lr, "peft.r": 16, "optim.warmup_ratio": 0.1},
            "points": [[step, step / 2, loss] for step, loss in zip(range(10, 61, 10), losses)]}


def test_the_replay_measures_trial_steps_and_regret_against_the_unpruned_sweep_of_the_same_seed(replay):
    # Two configurations at the ends of the LR range: a low LR that improves steadily (objective 0.60, its best
    # validation), a high one that reaches 0.40 at step 30 and then climbs back above its first validation.
    recorded = {"max_steps": 60, "max_warmup_ratio": 0.2, "curves": [
        curve(1e-4, [1.0, 0.8, 0.7, 0.65, 0.62, 0.60]), curve(3e-2, [1.0, 0.5, 0.4, 1.2, 1.3, 1.4])]}
    space = replay.search_space()
    # Trial k of a seed's sweep draws with a random sampler seeded seed + k; it gets the curve nearest its LR.
    high = [sum(proposed_lr(space, seed + k) > math.sqrt(1e-4 * 3e-2) for k in range(3)) for seed in range(4)]
    assert set(high) == {1, 2}, high  # each sweep meets both curves (with Optuna's draws of today: 1, 1, 2, 2)

    results = replay.replay(recorded, samplers=("random",), pruners=("schedule_aligned",), seeds=range(4), n_trials=3)

    # Unpruned: 3 x 60 trial-steps, best 0.40 (a high-LR trial). Schedule-aligned, with too few trials for a rung: its
    # guard stops each high-LR trial at step 40 (1.2 >= 1.0, its first validation), so the best is 0.60: regret
    # 0.60 / 0.40 - 1 = +50%, and each high-LR trial spends 40 steps instead of 60.
    assert results["random", "schedule_aligned"] == [
        {"share": pytest.approx((60 * (3 - n) + 40 * n) / 180), "regret": pytest.approx(0.5)} for n in high]


def proposed_lr(space: dict, seed: int) -> float:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask(space).params["optim.lr"]


def test_the_replay_is_deterministic_for_a_seed_and_pruning_saves_steps(replay):
    args = dict(samplers=("tpe", "random"), pruners=("none", "hyperband", "schedule_aligned"), seeds=range(2), n_trials=10)
    first, second = replay.replay(synthetic_curves(), **args), replay.replay(synthetic_curves(), **args)

    assert first == second
    assert all(run["share"] < 1 for run in first["random", "schedule_aligned"])  # the diverging lr 3e-2 stops early


# A live sweep's trials in the order they ran, each with its own curve and objective; the last one ends best.
LIVE_SWEEP = {"trials": [
    {"params": {"optim.lr": lr, "peft.r": 16, "optim.warmup_ratio": 0.1}, "points": list(points.items()),
     "value": min(points.values())}
    for lr, points in ((1e-4, LOW), (3e-4, FINISHED[3e-4]), (1e-2, HIGH), (3e-3, {25: 0.58, 50: 0.53, 100: 0.46}),
                       (1.1e-4, {25: 0.50, 50: 0.49, 100: 0.47}), (1.2e-2, {25: 0.58, 50: 0.56, 100: 0.42}))]}


@pytest.mark.parametrize("pruner, share, regret", [
    # nearest_bound decides from the fifth trial on (four complete). Trial 5 (lr 1.1e-4) at step 50, next to lr 1e-4:
    # 0.49 x 0.48 / 0.49 = 0.48 > 0.44, pruned. Trial 6 (lr 1.2e-2) at step 50, next to lr 1e-2, fell 3.4% where its
    # neighbour fell 8.3% (not catching up): 0.56 x 0.44 / 0.55 = 0.448 > 0.44, pruned. (4 x 100 + 50 + 50) / 600.
    ("nearest_bound", 500 / 600, 0.44 / 0.42 - 1),
    # median spares its first five trials; trial 6 at step 25: 0.58 > 0.52, the median of 0.50 0.52 0.60 0.58 0.50.
    ("median", 525 / 600, 0.44 / 0.42 - 1),
    ("none", 1.0, 0.0),
])
def test_a_live_sweep_replays_in_its_own_order_with_its_own_curves(replay, pruner, share, regret):
    recorded = {"max_steps": 100, "max_warmup_ratio": 0.2, "curves": []}

    result = replay.replay_in_order(LIVE_SWEEP, replay.search_space(), pruner, recorded)

    assert result == {"share": pytest.approx(share), "regret": pytest.approx(regret)}


def test_rank_correlation_is_kendall_tau_of_each_rungs_loss_against_the_final_loss_on_both_clocks(replay):
    # Final losses rank a < b < c < d. c and d warm up longer, so they reach each LR area one validation later.
    short_warmup, long_warmup = [5, 10, 15, 20], [3, 8, 13, 18]  # LR area at steps 10, 20, 30, 40
    losses = {"a": ([1.3, 0.8, 0.62, 0.40], short_warmup), "b": ([1.2, 0.9, 0.60, 0.50], short_warmup),
              "c": ([1.1, 1.0, 0.70, 0.60], long_warmup), "d": ([1.0, 1.1, 0.80, 0.70], long_warmup),
              "diverged": ([1.0, 0.9, math.nan, math.nan], short_warmup)}
    curves = [{"params": {}, "points": [list(point) for point in zip((10, 20, 30, 40), areas, values)]}
              for values, areas in losses.values()]

    taus = replay.rank_correlations({"max_steps": 40, "max_warmup_ratio": 0.25, "curves": curves})

    # tau = (concordant - discordant pairs) / 6 over the four finite curves (the diverged one is left out); a tie is
    # neither. LR-area rungs: the longest warm-up (10 steps) covers an area of 5, then x2 while below 40 / 2.
    assert taus == {
        ("step", 10): pytest.approx(-1),      # every pair in reverse
        ("step", 20): pytest.approx(1),       # every pair in order
        ("step", 30): pytest.approx(4 / 6),   # a and b swapped: 5 - 1
        # area 5: a, b at step 10 (1.3, 1.2); c, d at step 20 (1.0, 1.1): only c-d in order, 1 - 5
        ("lr_area", 5): pytest.approx(-4 / 6),
        # area 10: a, b at step 20 (0.8, 0.9); c, d at step 30 (0.7, 0.8): a-b and c-d in order, a-d tied, 2 - 3
        ("lr_area", 10): pytest.approx(-1 / 6),
    }


def test_a_trial_reports_its_validations_on_the_lr_area_clock_of_its_own_schedule():
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel
    from omegaconf import OmegaConf

    import torch

    from tunelab.optim import build_scheduler
    from tunelab.sweep.trial import StudyTrialCallback

    optim = OmegaConf.create({"total_steps": None, "warmup_steps": None, "warmup_ratio": 0.2, "min_lr_ratio": 0.1})
    peak, lrs = 0.1, []

    class LoggingModel(BoringModel):  # trained with tunelab's schedule, recording the LR of every step
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=peak)
            scheduler = build_scheduler(optimizer, optim, int(self.trainer.estimated_stepping_batches))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def on_train_batch_start(self, batch, batch_idx):
            lrs.append(self.optimizers().param_groups[0]["lr"])

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.step(batch))

    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    trainer = pl.Trainer(max_steps=20, val_check_interval=5, limit_val_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=[StudyTrialCallback(trial, "val/loss", lr_area_of=optim)])
    trainer.fit(LoggingModel())

    # Validations at steps 5, 10, 15, 20 report at the LR area the run had covered: the sum of its LRs / peak LR.
    # Worked out by hand: warm-up 4 steps (0.2, 0.4, 0.6, 0.8) and the peak at step 4 make 3.0 by step 5; the 16 cosine
    # steps average 0.55 (their cosines cancel in pairs), 2.0 + 8.8 = 10.8 by step 20; 7.49 and 10.02 in between.
    assert len(lrs) == 20
    assert sorted(study.trials[0].intermediate_values) == [round(sum(lrs[:s]) / peak) for s in (5, 10, 15, 20)] == [3, 7, 10, 11]
