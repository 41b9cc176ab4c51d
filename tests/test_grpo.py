"""GRPO (module=grpo, tunelab.modules.grpo) on rewards a program checks: equal to trl's GRPOTrainer loss on the same
completions, advantages normalised within each prompt's group, training through train.py with generation, raising
greedy exact match from an SFT export, resuming and scaling out like SFT, and refusing bad inputs with one line."""

import copy
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import compose_config, logged, run_train

# Of one length: trl left-pads prompts under an attention mask, which tunelab's attention (no padding mask) ignores.
PROMPTS = ["reverse abc=", "upper hello=", "double abcd="]
# Two completions of each prompt (G = 2): most through EOS, one cut at max_new_tokens (no EOS).
COMPLETIONS = ["cba", "cab", "HELLO", "HELLOHELLOHE", "abcdabcd", "abcd"]
MAX_NEW_TOKENS = 12
VARIANTS = {  # ours -> trl's loss_type
    "sequence_mean": "grpo", "token_mean": "bnpo", "dr_grpo": "dr_grpo",
}


def tiny_model(tmp_path, dataset_cache, peft: str = "none"):
    """The embedded model in float64 (a LoRA adapter on it where `peft`), with the char tokenizer."""
    from tunelab.char_tokenizer import build_char_tokenizer
    from tunelab.model import build_model
    from tunelab.peft import apply_peft

    tokenizer = build_char_tokenizer()
    cfg = compose_config([f"peft={peft}", "peft.lora_dropout=0.0"] if peft != "none" else [], tmp_path, dataset_cache)
    torch.manual_seed(0)
    model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer).double(), cfg.peft)
    return model, tokenizer, cfg


def fixed_completions(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) per completion: prompts with BOS, completions through EOS unless cut."""
    prompts = [[tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS for _ in (0, 1)]
    completions = []
    for text in COMPLETIONS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        completions.append(ids if len(ids) >= MAX_NEW_TOKENS else ids + [tokenizer.eos_token_id])
    return prompts, completions


def our_layout(prompts, completions, pad_id: int):
    """tunelab's rows: prompt + completion right-padded, labels on the completion tokens."""
    from tunelab.data.formats import IGNORE_INDEX

    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad_id)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[i, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        labels[i, len(prompt):len(prompt) + len(completion)] = torch.tensor(completion)
    return input_ids, labels


def trl_layout(prompts, completions, pad_id: int) -> dict:
    """trl's inputs: prompts left-padded, completions right-padded, each with its mask."""
    prompt_width, completion_width = max(map(len, prompts)), max(map(len, completions))
    batch = {name: torch.zeros(len(prompts), width, dtype=torch.long) for name, width in
             [("prompt_ids", prompt_width), ("prompt_mask", prompt_width), ("completion_ids", completion_width),
              ("completion_mask", completion_width)]}
    batch["prompt_ids"].fill_(pad_id)
    batch["completion_ids"].fill_(pad_id)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        batch["prompt_ids"][i, prompt_width - len(prompt):] = torch.tensor(prompt)
        batch["prompt_mask"][i, prompt_width - len(prompt):] = 1
        batch["completion_ids"][i, :len(completion)] = torch.tensor(completion)
        batch["completion_mask"][i, :len(completion)] = 1
    return batch


def to_our_tokens(values: torch.Tensor, prompts, completions, width: int) -> torch.Tensor:
    """Per-token values in trl's completion layout, moved to tunelab's (aligned with labels[:, 1:])."""
    out = torch.zeros(len(prompts), width - 1, dtype=values.dtype)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        out[i, len(prompt) - 1:len(prompt) - 1 + len(completion)] = values[i, :len(completion)]
    return out


def to_trl_tokens(values: torch.Tensor, prompts, completions, width: int) -> torch.Tensor:
    """The reverse of to_our_tokens: each completion's values from tunelab's layout, right-padded with zeros."""
    out = torch.zeros(len(prompts), width, dtype=values.dtype)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        out[i, :len(completion)] = values[i, len(prompt) - 1:len(prompt) - 1 + len(completion)]
    return out


def trl_oracle(policy, inputs: dict, loss_type: str, beta: float, epsilon_low: float, epsilon_high: float,
               temperature: float) -> tuple[float, dict]:
    """trl's own GRPO loss and metrics (GRPOTrainer._compute_loss, trl >= 1.0) on the same completions: a GRPOTrainer
    given only the attributes that method reads, with trl's fused LM head (at the temperature) on a copy of the model."""
    from accelerate import Accelerator
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = copy.deepcopy(policy)
    add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model, temperature=temperature,
                      outputs=("log_probs", "entropy"))
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.model, trainer.accelerator = model, Accelerator(cpu=True)
    trainer.args = SimpleNamespace(use_bias_correction_kl=False, delta=None)
    trainer.loss_type, trainer.beta, trainer.epsilon_low, trainer.epsilon_high = loss_type, beta, epsilon_low, epsilon_high
    trainer.max_completion_length, trainer.temperature = MAX_NEW_TOKENS, temperature
    trainer.top_entropy_quantile, trainer.aux_loss_enabled, trainer.off_policy_mask_threshold = 1.0, False, None
    trainer.importance_sampling_level, trainer.use_vllm, trainer._entropy_bonus_enabled = "token", False, False
    trainer.current_gradient_accumulation_steps = 1
    trainer._metrics = defaultdict(lambda: defaultdict(list))
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    metrics = trainer._metrics["train"]
    theirs = {"clip_ratio": metrics["clip_ratio/region_mean"][-1]}
    if beta:
        theirs["kl"] = metrics["kl"][-1]
    return loss.item(), theirs, gradients(model)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 0.2], dtype=torch.float64)  # the second group's are all equal


@pytest.mark.parametrize("loss_type,scale_rewards,beta,reused,epsilon_high", [
    ("sequence_mean", True, 0.0, False, None),
    ("sequence_mean", False, 0.0, True, 0.28),
    ("token_mean", True, 0.0, True, None),
    ("dr_grpo", False, 0.0, True, None),
    ("sequence_mean", True, 0.04, True, None),
    ("token_mean", False, 0.1, False, 0.28),
], ids=["grpo", "grpo_unscaled_reused_clip_high", "token_mean_reused", "dr_grpo_reused", "grpo_kl_reused",
        "token_mean_unscaled_kl"])
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_loss_equals_trls_grpo_loss_on_the_same_completions(tmp_path, dataset_cache, loss_type, scale_rewards, beta,
                                                            reused, epsilon_high, peft):
    from tunelab.modules.grpo import GRPOModule, Rollout, group_advantages, token_logps

    model, tokenizer, cfg = tiny_model(tmp_path, dataset_cache, peft)
    if peft == "lora":  # the adapter away from zero, so the policy is not the base
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    temperature = 0.7
    module = GRPOModule(model, cfg.optim, rewards=[{"_target_": "tunelab.rewards.exact_match"}], num_generations=2,
                        max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, epsilon=0.2, epsilon_high=epsilon_high,
                        beta=beta, scale_rewards=scale_rewards, loss_type=loss_type,
                        num_iterations=2 if reused else 1)
    prompts, completions = fixed_completions(tokenizer)
    input_ids, labels = our_layout(prompts, completions, tokenizer.pad_token_id)
    inputs = trl_layout(prompts, completions, tokenizer.pad_token_id)
    advantages, all_equal = group_advantages(REWARDS, 2, scale_rewards)
    assert all_equal.tolist() == [False, True, False]
    inputs["advantages"] = advantages

    with torch.no_grad():
        now = token_logps(model, input_ids, labels, temperature)
    width = input_ids.size(1)
    now_trl = to_trl_tokens(now, prompts, completions, inputs["completion_ids"].size(1))
    generator = torch.Generator().manual_seed(2)
    old = reference = None
    if reused:  # the sampling policy a few steps back: ratios off 1, some clipped
        old_trl = now_trl + 0.3 * torch.randn(now_trl.shape, generator=generator, dtype=torch.float64)
        inputs["old_per_token_logps"] = old_trl
        old = to_our_tokens(old_trl, prompts, completions, width)
    if beta:
        reference_trl = now_trl + 0.3 * torch.randn(now_trl.shape, generator=generator, dtype=torch.float64)
        inputs["ref_per_token_logps"] = reference_trl
        reference = to_our_tokens(reference_trl, prompts, completions, width)
    rollout = Rollout(input_ids, labels, advantages, old, reference, REWARDS[:, None], torch.tensor([0]),
                      torch.tensor([False]), all_equal)

    ours, metrics = module.rollout_loss(rollout)
    ours.backward()
    our_gradients = gradients(model)
    model.zero_grad(set_to_none=True)
    theirs, their_metrics, their_gradients = trl_oracle(model, inputs, VARIANTS[loss_type], beta, 0.2,
                                                        epsilon_high or 0.2, temperature)
    assert ours.item() == pytest.approx(theirs, rel=0, abs=1e-5)
    assert our_gradients.keys() == their_gradients.keys() and our_gradients
    for name, gradient in their_gradients.items():  # at ratio 1 the loss is -mean(A) = 0: the gradient is the test
        assert torch.allclose(our_gradients[name], gradient, rtol=0, atol=1e-6), name
    assert max(gradient.abs().max() for gradient in their_gradients.values()) > 1e-3
    for name, value in their_metrics.items():
        assert float(metrics[name]) == pytest.approx(value, rel=0, abs=1e-5), name
    if reused:
        assert their_metrics["clip_ratio"] > 0  # the clipped branch was exercised


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_the_kl_reference_is_the_model_as_the_run_found_it(tmp_path, dataset_cache, peft):
    # beta > 0: the adapter switched off under LoRA, a frozen copy of a full fine-tune; training moves neither.
    from tunelab.modules.grpo import GRPOModule, token_logps

    model, tokenizer, cfg = tiny_model(tmp_path, dataset_cache, peft)
    module = GRPOModule(model, cfg.optim, rewards=[{"_target_": "tunelab.rewards.exact_match"}], beta=0.1)
    assert module.reference == ("adapter" if peft == "lora" else "copy")
    input_ids, labels = our_layout(*fixed_completions(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        found = token_logps(model, input_ids, labels)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and (peft == "none" or "lora_B" in name):
                parameter.add_(0.05 * torch.randn_like(parameter))
        assert not torch.allclose(token_logps(model, input_ids, labels), found, atol=1e-6)
    assert torch.allclose(module.reference_logps(input_ids, labels), found, rtol=0, atol=1e-12)


def test_advantages_are_normalised_within_each_prompts_group():
    # Group of 4 rewards [1, 0, 0, 0]: mean 0.25, unbiased std 0.5; a group whose rewards are all equal has no signal.
    from tunelab.modules.grpo import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    advantages, all_equal = group_advantages(rewards, 4, scale=True)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    assert torch.allclose(advantages[:4], expected.double())
    assert torch.equal(advantages[4:], torch.zeros(4, dtype=torch.float64))
    assert all_equal.tolist() == [False, True]
    unscaled, _ = group_advantages(rewards, 4, scale=False)  # Dr. GRPO: centred only
    assert torch.allclose(unscaled, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], dtype=torch.float64))


def test_chunked_log_probs_equal_the_logits_ones_at_temperature(tmp_path, dataset_cache):
    from tunelab.modules.grpo import token_logps

    model, tokenizer, _ = tiny_model(tmp_path, dataset_cache)
    prompts, completions = fixed_completions(tokenizer)
    input_ids, labels = our_layout(prompts, completions, tokenizer.pad_token_id)
    weights = torch.linspace(-1, 1, input_ids.size(1) - 1, dtype=torch.float64)
    results = []
    for chunk in (None, 5):
        model.zero_grad()
        logps = token_logps(model, input_ids, labels, 0.7, chunk)
        (logps * weights).sum().backward()
        results.append((logps.detach(), model.get_input_embeddings().weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-10)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-10)


# ── config and inputs refused with one line ──────────────────────────────────────────────────────────────────────


def constant_reward(prompts, completions, **row):
    return [1.0] * len(completions)


def one_reward_short(prompts, completions, **row):
    return [0.0] * (len(completions) - 1)


@pytest.mark.parametrize("args,message", [
    (["module.num_generations=1"], "module.num_generations=1 must be >= 2: advantages compare the completions of one prompt"),
    (["module.rewards=[{_target_: tunelab.rewards.no_such_reward}]"],
     r"module.rewards\[0\]._target_=tunelab.rewards.no_such_reward: tunelab.rewards has no no_such_reward"),
    (["module.rewards=[]"], "module.rewards=\\[\\] must be a non-empty list of reward functions"),
    (["module.rewards=[{_target_: tunelab.rewards.exact_match, weight: high}]"],
     r"module.rewards\[0\].weight=high must be a number"),
    (["module.loss_type=ppo"], "module.loss_type=ppo is not one of: sequence_mean, token_mean, dr_grpo"),
    (["data=random_tokens"], "module=grpo samples completions of the SFT data's prompts"),
], ids=["one_generation", "missing_reward", "no_rewards", "weight_not_a_number", "unknown_loss", "pairs"])
def test_bad_grpo_keys_are_refused_with_one_line(tmp_path, dataset_cache, args, message):
    from tunelab.config import ConfigError, validate_config

    cfg = compose_config(["module=grpo", "logger=none", *args], tmp_path, dataset_cache)
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("args,message", [
    (["module.rewards=[{_target_: tests.test_grpo.one_reward_short}]"],
     "module.rewards: on data row 1, reward one_reward_short returned 7 values for 8 completions"),
    (["module.max_new_tokens=250"], "its prompt is .* tokens, and with module.max_new_tokens=250 it runs past the "
                                    "model's context of 256 tokens"),
], ids=["reward_of_wrong_length", "prompt_past_the_context"])
def test_bad_grpo_inputs_are_refused_with_one_line_before_any_weights_load(tmp_path, dataset_cache, args, message):
    from tunelab.config import ConfigError, validate_config
    from tunelab.inputs import check_inputs, load_tokenizer

    cfg = compose_config(["module=grpo", "logger=none", "data.num_examples=400", *args], tmp_path, dataset_cache)
    validate_config(cfg)
    with pytest.raises(ConfigError, match=message) as error:
        check_inputs(cfg, load_tokenizer(cfg.model))
    assert "\n" not in str(error.value)


# ── whole runs, from one SFT export ──────────────────────────────────────────────────────────────────────────────

QUIET = ["eval=none", "callbacks.progress_bar=null", "trainer.log_every_n_steps=1"]
SFT_STEPS = 600


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory, dataset_cache) -> Path:
    """README's first command: SFT on the embedded task with half its `double` answers cut short (data=tiny_flawed),
    exported: a model that stops after one copy on about half its `double` prompts, which sampling sometimes does not."""
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    run_train([*QUIET, "logger=csv", "data=tiny_flawed", f"trainer.max_steps={SFT_STEPS}",
               f"trainer.val_check_interval={SFT_STEPS}",
               "validate_at_start=false", "callbacks.samples=null", "callbacks.early_stopping=null"], run_dir,
              dataset_cache)
    return run_dir / "export"


def small_grpo(sft_export: Path) -> list[str]:
    return [*QUIET, "logger=csv", "module=grpo", "model=sft_export", f"model.name_or_path={sft_export}",
            "data=tiny_flawed", "module.rewards=[{_target_: tunelab.rewards.embedded_task}]", "data.batch_size=4",
            "module.num_generations=4", "module.max_new_tokens=10", "data.max_val_examples=16", "callbacks.samples=null",
            "callbacks.early_stopping=null", "export=false", "optim.lr=3e-4", "validate_at_start=false"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, dataset_cache, sft_export):
    """README's second command, experiment=tiny_grpo from the export, tracked in MLflow."""
    run_dir = tmp_path_factory.mktemp("grpo") / "recipe"
    uri = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    result = run_train([*QUIET, "experiment=tiny_grpo", f"model.name_or_path={sft_export}", "logger=mlflow"], run_dir,
                       dataset_cache, tracking_uri=uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-grpo").experiment_id])
    return client, run, result


def history(client, run, key: str) -> dict[int, float]:
    return {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, key)}


def test_tiny_grpo_raises_greedy_exact_match_on_held_out_prompts(recipe):
    # val/reward: the greedy answers' reward on the held-out prompts, their exact match against the task's answer
    # computed from the prompt. The step-0 validation is the SFT export itself on the same prompts (the SFT run's own
    # split). Against the rows' flawed answers (val/exact_match) the fixed `double` answers count as misses: it falls.
    client, run, result = recipe
    exact = history(client, run, "val/reward")
    first, best = exact[min(exact)], max(value for step, value in exact.items() if step > min(exact))
    assert best >= first + 0.1, exact
    flawed = history(client, run, "val/exact_match")
    assert flawed[max(flawed)] < flawed[min(flawed)]
    rewards = history(client, run, "train/reward")
    steps = sorted(rewards)
    early, late = steps[:10], steps[-10:]
    assert sum(rewards[s] for s in late) / 10 > sum(rewards[s] for s in early) / 10, rewards
    assert "objective val/reward (max)" in result.stdout


def test_grpo_logs_rewards_groups_lengths_clipping_and_generation_share_with_a_completions_table(recipe):
    import json

    import mlflow

    client, run, _ = recipe
    metrics = run.data.metrics
    for name in ("train/reward", "train/reward_std", "train/rewards/embedded_task/mean", "train/rewards/embedded_task/std",
                 "train/frac_reward_zero_std", "train/completions/mean_length", "train/completions/max_length",
                 "train/completions/clipped_ratio", "train/clip_ratio", "train/generation_share"):
        assert name in metrics, name
    assert 0 < metrics["train/generation_share"] < 1
    assert 0 <= metrics["train/frac_reward_zero_std"] <= 1 and 0 <= metrics["train/completions/clipped_ratio"] <= 1
    assert 1 <= metrics["train/completions/mean_length"] <= metrics["train/completions/max_length"] <= 12
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="grpo_completions.json",
                                               tracking_uri=client._tracking_client.tracking_uri)
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["step", "prompt", "completion", "embedded_task", "advantage"]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == 3 * 2 * 8  # three validations, two groups of eight each
    for row in rows:
        assert row["embedded_task"] in (0.0, 1.0) and row["prompt"].endswith("=")


def test_a_constant_reward_leaves_the_weights_unchanged(tmp_path, dataset_cache, sft_export):
    # Every advantage is zero, so with no KL term (and no weight decay) no step moves a weight.
    from safetensors.torch import load_file

    run_train([*small_grpo(sft_export), "module.rewards=[{_target_: tests.test_grpo.constant_reward}]",
               "optim.weight_decay=0", "trainer.max_steps=2", "trainer.val_check_interval=2", "export=true"],
              tmp_path / "run", dataset_cache)
    before, after = load_file(sft_export / "model.safetensors"), load_file(tmp_path / "run" / "export" / "model.safetensors")
    assert before.keys() == after.keys()
    for name, weight in before.items():
        assert torch.equal(after[name], weight), name
    series = logged(tmp_path / "run")
    assert series["train/frac_reward_zero_std"] == {0: 1.0, 1: 1.0}


def test_resume_mid_iteration_gives_the_losses_of_a_straight_run(tmp_path, dataset_cache, sft_export):
    # num_iterations=2: step 3 reuses step 2's completions, which the resumed run reads from the checkpoint; each
    # prompt's sampling is seeded, so the completions of step 2 onwards are the straight run's too.
    common = [*small_grpo(sft_export), "module.num_iterations=2", "trainer.val_check_interval=3", "optim.total_steps=4"]
    run_train([*common, "trainer.max_steps=4"], tmp_path / "straight", dataset_cache)
    run_train([*common, "trainer.max_steps=3"], tmp_path / "resumed", dataset_cache)
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3 and "grpo_rollout" in checkpoint
    run_train([*common, "trainer.max_steps=4", "ckpt_path=last"], tmp_path / "resumed", dataset_cache)

    straight, resumed = logged(tmp_path / "straight"), logged(tmp_path / "resumed")
    assert sorted(resumed["train/loss"]) == sorted(straight["train/loss"]) == [0, 1, 2, 3]
    for name in ("train/loss", "train/reward", "train/completions/mean_length", "train/clip_ratio", "val/loss"):
        for step, value in straight[name].items():
            assert resumed[name][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, step)
    assert straight["train/frac_reward_zero_std"][3] < 1 and straight["train/loss"][3] != 0  # a reused rollout


DDP2 = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def test_ddp_on_two_processes_equals_one_process(tmp_path, dataset_cache, sft_export):
    # Each rank samples its own prompts' groups (seeded per prompt) and averages over its completions; DDP's mean of
    # the two ranks' gradients is one process's over all of them, so the trained weights are one process's.
    # (val/loss is not compared: it averages per-batch token means, and the batches differ.)
    import json

    from safetensors.torch import load_file

    common = [*small_grpo(sft_export), "trainer.max_steps=2", "trainer.val_check_interval=2", "optim.total_steps=2",
              "export=true"]
    run_train([*common, "data.batch_size=8"], tmp_path / "one", dataset_cache)
    run_train([*common, *DDP2, "data.batch_size=4"], tmp_path / "two", dataset_cache)
    one, two = (json.loads((tmp_path / name / "objective.json").read_text()) for name in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    base = load_file(sft_export / "model.safetensors")
    one, two = (load_file(tmp_path / name / "export" / "model.safetensors") for name in ("one", "two"))
    moved = max((one[name] - base[name]).abs().max() for name in base)
    assert moved > 1e-4  # some group had a signal: the weights moved
    first, second = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert second["grad_norm/total"] == pytest.approx(first["grad_norm/total"], rel=1e-5)  # the same gradients
    # Adam's first steps are about lr * sign(gradient): where a gradient is near zero, the order of DDP's sum flips it,
    # so the weights agree to a small share of what the steps moved them, not to float precision.
    differ = max((two[name] - weight).abs().max() for name, weight in one.items())
    assert differ < 0.1 * moved, (differ, moved)


def test_an_optuna_sweep_over_beta_lr_and_group_size_searches_grpo_like_any_other(tmp_path, dataset_cache, sft_export):
    import json
    import subprocess
    import sys

    import optuna

    from tests.conftest import ROOT, mlflow_runs, subprocess_env

    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/sweeper=study", f"hydra.sweeper.storage={storage}",
               "hydra.sweeper.study_name=grpo", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'multirun'}",
               'hydra.sweeper.params={module.beta: "interval(0.0, 0.1)", optim.lr: "tag(log, interval(1e-5, 1e-3))", '
               'module.num_generations: "choice(2, 4)"}',
               "objective.metric=val/exact_match", "objective.mode=max", "logger=mlflow",
               *(arg for arg in small_grpo(sft_export) if not arg.startswith(("optim.lr", "logger", "module.num_gen"))),
               "trainer.max_steps=2", "trainer.val_check_interval=2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=subprocess_env(tmp_path, dataset_cache, uri))
    assert result.returncode == 0, result.stderr[-3000:]

    trials = optuna.load_study(study_name="grpo", storage=storage).trials
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in trials:
        assert 0 <= trial.params["module.beta"] <= 0.1 and trial.params["module.num_generations"] in (2, 4)
        outcome = json.loads((tmp_path / "multirun" / str(trial.number) / "objective.json").read_text())
        assert (outcome["metric"], outcome["objective"]) == ("val/exact_match", pytest.approx(trial.value))
    parents, children = mlflow_runs(uri)
    assert len(parents) == 1 and len(children) == 2
