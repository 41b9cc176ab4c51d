"""GRPO (module=grpo, tunelab.modules.grpo) on rewards a program checks: equal to trl's GRPOTrainer loss on the same
completions, advantages normalised within each prompt's group, training through train.py with generation, raising
greedy exact match from an SFT export, resuming and scaling out like SFT, and refusing bad inputs with one line."""

import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import compose_config

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
    from tunelab.modules.grpo import GRPOModule, Rollout, group_advantages

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

    generator = torch.Generator().manual_seed(2)
    noise = lambda: 0.3 * torch.randn(inputs["completion_ids"].shape, generator=generator, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        from tunelab.modules.grpo import token_logps

        now = token_logps(model, input_ids, labels, temperature)
    width = input_ids.size(1)
    now_trl = to_trl_tokens(now, prompts, completions, inputs["completion_ids"].size(1))
    old = reference = None
    if reused:  # the sampling policy a few steps back: ratios off 1, some clipped
        old_trl = now_trl + noise()
        inputs["old_per_token_logps"] = old_trl
        old = to_our_tokens(old_trl, prompts, completions, width)
    if beta:
        reference_trl = now_trl + noise()
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
