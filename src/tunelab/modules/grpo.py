"""`module=grpo`: Group Relative Policy Optimization against rewards a program checks (Shao et al. 2024, DeepSeekMath).

Each training step takes a batch of the SFT data's prompts (an alpaca row's prompt, a chat row's messages up to its
last assistant turn: the tokens before the row's last labelled span), samples `num_generations` (G) completions of
each from the policy (transformers' `generate` with its KV cache; temperature, top-p, `max_new_tokens`), scores them
with `rewards` (tunelab.rewards: plain functions, each with a weight) and gives each completion its advantage within its
group of G: its weighted reward minus the group's mean, over the group's std (`scale_rewards`; off, with
`loss_type=dr_grpo`, it is Dr. GRPO, Liu et al. 2025). The loss is PPO's clipped surrogate per completion token,
-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) with r the ratio of the policy's token probability to the one it
had when it sampled, plus beta times the k3 estimate of KL(policy || reference) per token where beta > 0, averaged:

- `sequence_mean`: over each completion's tokens, then over completions (trl's `grpo`, the paper's);
- `token_mean`: over all completion tokens of the batch (trl's `bnpo`): long completions weigh by their length;
- `dr_grpo`: summed, over completions x max_new_tokens (a constant): no bias towards short or long answers.

The same completions serve `num_iterations` optimizer steps (the paper's mu): the first step's ratio is 1, the later
ones' are clipped. The reference is the model as the run found it: its LoRA adapter switched off, or a frozen copy.

Temperature scales the logits that the loss reads as well as the sampler's, so r and the KL compare the distribution
that was sampled from. Checked against trl's GRPOTrainer loss in tests/test_grpo.py.
"""

import functools
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from tunelab.data.formats import IGNORE_INDEX
from tunelab.modules.dpo import frozen_copy, reference_kind
from tunelab.modules.logprobs import ChunkedTargetLogProbs
from tunelab.generation import end_tokens, greedy_answer
from tunelab.kernels import model_loss
from tunelab.modules.causal_lm import CausalLMModule
from tunelab.rewards import RewardError
from tunelab.samples import generation_context
from tunelab.strategy import shards_model
from tunelab.targets import import_target

LOSS_TYPES = ("sequence_mean", "token_mean", "dr_grpo")
REFERENCES = ("auto", "adapter", "copy")
COMPLETIONS_TABLE = "grpo_completions.json"  # an MLflow table: prompt, completion, each reward, advantage, step
TABLE_GROUPS = 2  # groups of each validation's last rollout that go into the table


# ── advantages and the loss ──────────────────────────────────────────────────────────────────────────────────────


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(each completion's advantage, whether each group's rewards are all equal). `rewards`: one per completion, the G
    of a prompt next to each other. Scaled by the group's (unbiased) std plus 1e-4, as trl does, where `scale`."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    std = groups.std(1, keepdim=True)
    advantages = centred / (std + 1e-4) if scale else centred
    return advantages.flatten(), torch.isclose(std, torch.zeros_like(std)).squeeze(1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon_low: float, epsilon_high: float, loss_type: str, max_new_tokens: int, beta: float = 0.0,
              reference_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) from per-token log-probabilities (completions x tokens; `mask` 1 on completion tokens) under the
    policy now, the policy that sampled (`old_logps`) and the reference; one advantage per completion."""
    mask = mask.to(logps.dtype)
    advantages = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    metrics = {}
    if beta:
        # k3 (Schulman 2020): exp(q - p) - (q - p) - 1 >= 0, an unbiased, low-variance estimate of KL(policy || ref)
        difference = reference_logps - logps
        kl = torch.exp(difference) - difference - 1
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    if loss_type == "sequence_mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "token_mean":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_new_tokens)
    else:
        raise ValueError(f"module.loss_type={loss_type} is not one of: {', '.join(LOSS_TYPES)}")
    region = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    metrics["clip_ratio"] = masked_mean(region.to(logps.dtype).detach(), mask)
    return loss, metrics


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                chunk_size: int | None = None) -> torch.Tensor:
    """log p(token | the tokens before it) at temperature, for each labelled token, zero elsewhere; (rows, width - 1),
    aligned with labels[:, 1:]. `chunk_size`: from the last hidden state a chunk of tokens at a time, never the
    (tokens x vocab) logits (tunelab.modules.logprobs.ChunkedTargetLogProbs); None: from the model's logits."""
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    if chunk_size is None:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        logps = logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
        return logps * labelled
    from tunelab.kernels import decoder_and_head

    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    rows, columns = labelled.nonzero(as_tuple=True)
    # (h / T) W^T = (h W^T) / T: the temperature goes on the hidden state, before the chunked projection
    logps = ChunkedTargetLogProbs.apply(hidden[rows, columns] / temperature, head.weight, targets[rows, columns],
                                        chunk_size)
    return logps.new_zeros(targets.shape).index_put((rows, columns), logps)


# ── rewards ───────────────────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class Reward:
    name: str
    function: Callable[..., list[float]]
    weight: float


def build_rewards(specs: list) -> list[Reward]:
    """module.rewards' entries: `_target_` (a function's import path), `weight`, and the function's own keyword
    arguments. A name used twice gets its position appended (exact_match, exact_match_1)."""
    rewards = []
    for index, spec in enumerate(specs):
        spec = dict(spec)
        path, weight = spec.pop("_target_"), float(spec.pop("weight", 1.0))
        function = import_target(f"module.rewards[{index}]._target_", path)
        name = path.rsplit(".", 1)[-1]
        if any(reward.name == name for reward in rewards):
            name = f"{name}_{index}"
        rewards.append(Reward(name, functools.partial(function, **spec) if spec else function, weight))
    return rewards


def score(rewards: list[Reward], prompts: list[str], completions: list[str], row: dict[str, list]) -> torch.Tensor:
    """(completions, rewards) float64: each reward function's score of each completion."""
    columns = []
    for reward in rewards:
        values = reward.function(prompts, completions, **row)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise RewardError(f"reward {reward.name} returned {got} for {len(completions)} completions: a reward "
                              "function returns one number per completion")
        try:
            columns.append(torch.tensor([float(value) for value in values], dtype=torch.float64))
        except (TypeError, ValueError) as error:
            raise RewardError(f"reward {reward.name} returned a value that is not a number ({error})") from None
    return torch.stack(columns, dim=1)


# ── a rollout: completions, their rewards and advantages ─────────────────────────────────────────────────────────


@dataclass
class Rollout:
    """Completions of one batch of prompts, what the loss reads of them, and what the table shows."""
    input_ids: torch.Tensor          # prompt + completion, right-padded
    labels: torch.Tensor             # the completion tokens (through EOS); -100 on prompt and padding
    advantages: torch.Tensor         # one per completion
    old_logps: torch.Tensor | None   # the sampling policy's per-token log-probs (num_iterations > 1)
    reference_logps: torch.Tensor | None  # beta > 0
    rewards: torch.Tensor            # (completions, reward functions)
    lengths: torch.Tensor            # completion tokens
    cut: torch.Tensor                # no EOS within max_new_tokens
    all_equal: torch.Tensor          # per group

    def to_state(self) -> dict:
        return {field.name: getattr(self, field.name) for field in fields(self)}


def prompt_and_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """A tokenized SFT row's prompt (everything before its last labelled span: an alpaca prompt, a conversation up to
    its last assistant turn) and that span (the answer)."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return input_ids[:start], input_ids[start:end]


class GRPOModule(CausalLMModule):
    """A causal LM trained with GRPO on the SFT data's prompts (module docstring). Validation is CausalLMModule's
    (val/loss, val/exact_match on the held-out rows' answers) and the rewards of greedy answers to the held-out prompts:
    val/reward (weighted) and val/rewards/<name>.

    Logs per step: train/loss; train/reward and train/reward_std (the weighted sum), train/rewards/<name>/{mean,std};
    train/frac_reward_zero_std (groups whose rewards are all equal: no signal); train/completions/{mean_length,
    max_length,clipped_ratio} (cut at max_new_tokens); train/clip_ratio; train/kl (beta > 0); train/generation_share
    (of the step's time). Each validation appends the last rollout's first groups to the MLflow table
    grpo_completions.json."""

    # module.rewards holds functions by `_target_`, imported here and checked up front (tunelab.config.grpo), not
    # classes for tunelab.targets to build
    function_targets = ("rewards",)

    def __init__(self, model: PreTrainedModel, optim: DictConfig, rewards: list, num_generations: int = 8,
                 max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, num_iterations: int = 1,
                 epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0, reference: str = "auto",
                 scale_rewards: bool = True, loss_type: str = "sequence_mean", seed: int = 0,
                 adapter_only_checkpoints: bool = False, loss=model_loss):
        super().__init__(model, optim, adapter_only_checkpoints, loss)
        self.rewards = build_rewards(rewards)
        self.num_generations, self.max_new_tokens = num_generations, max_new_tokens
        self.temperature, self.top_p, self.num_iterations = temperature, top_p, num_iterations
        self.epsilon_low, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.beta, self.scale_rewards, self.loss_type, self.seed = beta, scale_rewards, loss_type, seed
        self.chunk_size = getattr(loss, "chunk_size", None)
        self.reference = reference_kind(reference, model) if beta else "none"
        # In a list, not as a submodule: not trained, not in checkpoints, not wrapped by DDP (as tunelab.modules.dpo's).
        self.frozen = [frozen_copy(model)] if self.reference == "copy" else []
        self.rollout: Rollout | None = None
        self.table_rows: list[dict] = []
        self.generation_seconds = 0.0
        self.step_started = 0.0

    # ── sampling ──

    def tokenizer(self):
        return self.trainer.datamodule.tokenizer

    @torch.no_grad()
    def sample(self, prompts: list[list[int]]) -> list[list[int]]:
        """G completions of each prompt (prompt i's are rows i*G .. i*G+G-1), each through its first end token or
        max_new_tokens.

        Each prompt's G are drawn on their own, from torch's RNG seeded by the run's seed, the step and the prompt's
        tokens: the same completions whichever rank draws them and whatever else is in its batch (DDP on any number of
        ranks equals one process), and after a resume. One prompt a call also needs no padding, which tunelab's
        attention does not mask."""
        tokenizer = self.tokenizer()
        ends = self.end_ids = end_tokens(tokenizer.eos_token_id) | end_tokens(self.model.generation_config.eos_token_id)
        config = GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0,
                                  max_new_tokens=self.max_new_tokens, use_cache=True, eos_token_id=sorted(ends),
                                  pad_token_id=tokenizer.pad_token_id)
        sharded = self.trainer.world_size > 1 and shards_model(self.trainer.strategy)
        devices = [self.device] if self.device.type == "cuda" else []
        completions = []
        was_training = self.model.training
        self.model.eval()
        with generation_context(self.trainer.strategy.model):
            for prompt in prompts:
                key = f"{self.seed}/{self.trainer.global_step}/{','.join(map(str, prompt))}".encode()
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(zlib.crc32(key))
                    inputs = torch.tensor([prompt] * self.num_generations, device=self.device)
                    output = self.model.generate(inputs=inputs, attention_mask=torch.ones_like(inputs),
                                                 generation_config=config, synced_gpus=sharded)
                for tokens in output[:, len(prompt):].tolist():
                    end = next((i for i, token in enumerate(tokens) if token in ends), None)
                    completions.append(tokens if end is None else tokens[:end + 1])
        self.model.train(was_training)
        return completions

    @torch.no_grad()
    def roll_out(self, batch: dict) -> Rollout:
        tokenizer, group = self.tokenizer(), self.num_generations
        rows = [prompt_and_answer(ids[:int(n)], labels[:int(n)]) for ids, labels, n in
                zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].sum(1).tolist())]
        prompts = [prompt for prompt, _ in rows]
        started = time.perf_counter()
        completions = self.sample(prompts)
        self.generation_seconds += time.perf_counter() - started

        def text(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        prompt_texts = [text(prompt) for prompt in prompts for _ in range(group)]
        answers = [text(answer) for _, answer in rows for _ in range(group)]
        completion_texts = [text(completion) for completion in completions]
        rewards = score(self.rewards, prompt_texts, completion_texts, {"answer": answers})
        weights = torch.tensor([reward.weight for reward in self.rewards], dtype=torch.float64)
        advantages, all_equal = group_advantages(rewards @ weights, group, self.scale_rewards)

        sequences = [prompts[i // group] + completion for i, completion in enumerate(completions)]
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, (sequence, completion) in enumerate(zip(sequences, completions)):
            input_ids[i, :len(sequence)] = torch.tensor(sequence)
            labels[i, len(sequence) - len(completion):len(sequence)] = torch.tensor(completion, dtype=torch.long)
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        old = self.policy_logps(input_ids, labels, grad=False) if self.num_iterations > 1 else None
        reference = self.reference_logps(input_ids, labels) if self.beta else None
        lengths = torch.tensor([len(completion) for completion in completions])
        cut = torch.tensor([len(c) == self.max_new_tokens and c[-1] not in self.end_ids for c in completions])
        self.table_rows = [{"step": self.trainer.global_step, "prompt": prompt_texts[i], "completion": completion_texts[i],
                            **{reward.name: float(rewards[i, k]) for k, reward in enumerate(self.rewards)},
                            "advantage": float(advantages[i])}
                           for i in range(min(len(completions), TABLE_GROUPS * group))]
        return Rollout(input_ids, labels, advantages.to(self.device), old, reference, rewards, lengths, cut, all_equal)

    def policy_logps(self, input_ids: torch.Tensor, labels: torch.Tensor, grad: bool = True) -> torch.Tensor:
        if grad:
            return token_logps(self.model, input_ids, labels, self.temperature, self.chunk_size)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            logps = token_logps(self.model, input_ids, labels, self.temperature, self.chunk_size)
        self.model.train(was_training)
        return logps

    @torch.no_grad()
    def reference_logps(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.reference == "adapter":
            with self.model.disable_adapter():
                return self.policy_logps(input_ids, labels, grad=False)
        copy = self.frozen[0]
        if next(copy.parameters()).device != self.device:
            copy.to(self.device)
        return token_logps(copy, input_ids, labels, self.temperature, self.chunk_size)

    # ── one step ──

    def rollout_loss(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = self.policy_logps(rollout.input_ids, rollout.labels)
        old = logps.detach() if rollout.old_logps is None else rollout.old_logps
        mask = rollout.labels[:, 1:] != IGNORE_INDEX
        return grpo_loss(logps, old, rollout.advantages.to(logps.dtype), mask, self.epsilon_low, self.epsilon_high,
                         self.loss_type, self.max_new_tokens, self.beta, rollout.reference_logps)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)  # a resumed run's RNG states, the sampler's among them
        self.step_started, self.generation_seconds = time.perf_counter(), 0.0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # A new batch of prompts every num_iterations steps; the loader's batches between are passed over.
        if self.rollout is None or self.trainer.global_step % self.num_iterations == 0:
            self.rollout = self.roll_out(batch)
        loss, metrics = self.rollout_loss(self.rollout)
        self.log_rollout(self.rollout, loss, metrics)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self.step_started
        self.log("train/generation_share", self.generation_seconds / max(elapsed, 1e-9), on_step=True, on_epoch=False,
                 batch_size=1)

    def log_rollout(self, rollout: Rollout, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        size = rollout.input_ids.size(0)
        weights = torch.tensor([reward.weight for reward in self.rewards], dtype=torch.float64)
        total = rollout.rewards @ weights
        values = {"train/loss": loss, "train/reward": total.mean(), "train/reward_std": total.std(),
                  "train/frac_reward_zero_std": rollout.all_equal.double().mean(),
                  "train/completions/mean_length": rollout.lengths.double().mean(),
                  "train/completions/max_length": rollout.lengths.max().double(),
                  "train/completions/clipped_ratio": rollout.cut.double().mean(),
                  **{f"train/{name}": value for name, value in metrics.items()}}
        for k, reward in enumerate(self.rewards):
            values[f"train/rewards/{reward.name}/mean"] = rollout.rewards[:, k].mean()
            values[f"train/rewards/{reward.name}/std"] = rollout.rewards[:, k].std()
        self.log("train/loss", values.pop("train/loss"), prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        self.log("train/reward", values.pop("train/reward").float(), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=size)
        self.log_dict({name: value.float() for name, value in values.items()}, on_step=True, on_epoch=False,
                      batch_size=size)

    # ── validation: SFT's, and the rewards of greedy answers ──

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)  # val/loss, val/exact_match on the rows' answers
        tokenizer = self.tokenizer()
        rows = [prompt_and_answer(ids[:int(n)], labels[:int(n)]) for ids, labels, n in
                zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].sum(1).tolist())]
        sharded = self.trainer.world_size > 1 and shards_model(self.trainer.strategy)
        with generation_context(self.trainer.strategy.model):
            answers = [greedy_answer(self.model, prompt, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                     self.max_new_tokens, self.device, synced_gpus=sharded) for prompt, _ in rows]

        def text(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        rewards = score(self.rewards, [text(prompt) for prompt, _ in rows], [text(answer) for answer in answers],
                        {"answer": [text(answer) for _, answer in rows]})
        weights = torch.tensor([reward.weight for reward in self.rewards], dtype=torch.float64)
        size = len(rows)
        self.log("val/reward", (rewards @ weights).mean().float(), prog_bar=True, sync_dist=True, batch_size=size)
        self.log_dict({f"val/rewards/{reward.name}": rewards[:, k].mean().float()
                       for k, reward in enumerate(self.rewards)}, sync_dist=True, batch_size=size)

    # ── the completions table ──

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.table_rows or not self.trainer.is_global_zero:
            return
        if isinstance(self.trainer.logger, MLFlowLogger):
            append_table(self.trainer.logger, self.table_rows, COMPLETIONS_TABLE)

    # ── checkpoints: the rollout that later iterations reuse ──

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.num_iterations > 1 and self.rollout is not None:
            checkpoint["grpo_rollout"] = {name: value.cpu() if isinstance(value, torch.Tensor) else value
                                          for name, value in self.rollout.to_state().items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("grpo_rollout")
        if state is not None:
            self.rollout = Rollout(**{name: value.to(self.device) if name in ("input_ids", "labels", "advantages",
                                                                                 "old_logps", "reference_logps")
                                      and value is not None else value for name, value in state.items()})


def append_table(logger: MLFlowLogger, rows: list[dict], name: str) -> None:
    """Adds rows to the run's MLflow table `name` (log_table appends by downloading it; its progress bar is off)."""
    switch = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(switch)
    os.environ[switch] = "false"
    try:
        logger.experiment.log_table(logger.run_id, {column: [row[column] for row in rows] for column in rows[0]}, name)
    finally:
        if before is None:
            del os.environ[switch]
        else:
            os.environ[switch] = before
