"""`module=dpo`: Direct Preference Optimization of a causal LM on preference pairs (tunelab.data.preference).

The policy's log-probability of each side's answer, against the reference policy's, gives each side an implicit reward
beta * (log pi(y|x) - log pi_ref(y|x)); the loss pushes the chosen reward above the rejected one:

- `sigmoid`: -log sigmoid(beta * margin), DPO (Rafailov et al. 2023);
- `ipo`: (margin per answer token - 1 / (2 beta))^2, IPO (Azar et al. 2023), each side's log-ratio averaged over its
  answer tokens as trl does;
- `robust`: sigmoid DPO unbiased for preference labels flipped with probability `label_smoothing` (Chowdhury et al.
  2024).

Two losses need no reference at all (no second pass, no copy, no table), each side's reward its own log-probability
averaged over its answer tokens:

- `simpo`: -log sigmoid(beta * (mean logp chosen - mean logp rejected) - gamma), SimPO (Meng et al. 2024), gamma
  the target reward margin (trl's CPOTrainer with loss_type=simpo);
- `orpo`: the chosen rows' negative log-likelihood minus `orpo_lambda` times log sigmoid of the log odds ratio of
  chosen over rejected, ORPO (Hong et al. 2024). Its NLL covers every token of the chosen row, prompt included, as
  the paper's code and trl's ORPOTrainer do (trl #1516, kept in #2527).

`sft_weight` > 0 adds that times the chosen answers' negative log-likelihood per token (trl's `sft` loss term; RPO,
Pang et al. 2024): plain DPO may lower the chosen answers' likelihood along with the rejected ones'.

The reference is the model as the run found it (an SFT export: model.name_or_path=<run>/export), kept without a
second copy where that can be: the same model with its LoRA adapter switched off (peft's `disable_adapter()`); a frozen
copy for a full fine-tune; or (`reference=precomputed`) each pair's log-probabilities computed once before the first
step and kept in the checkpoint, so a resumed full fine-tune does not take its trained weights for the reference.

Chosen and rejected go through the model in one forward (the collator stacks them, or with data.packing packs whole
pairs into one row whose sequences attend only to themselves). With the fused loss path (kernels.loss=chunked or
liger, the default on GPUs) the log-probabilities of the answer tokens come from the last hidden state and the output
projection a chunk of tokens at a time, never the (tokens x vocab) logits (tunelab.modules.logprobs). Checked against
trl's DPOTrainer, CPOTrainer (simpo) and ORPOTrainer in tests/test_dpo.py.
"""

from contextlib import nullcontext
from copy import deepcopy

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedModel

from tunelab.config.training import REFERENCE_FREE
from tunelab.kernels import model_loss
from tunelab.modules.base import FineTuningModule
from tunelab.modules.logprobs import sequence_logps


# ── the loss ──────────────────────────────────────────────────────────────────────────────────────────────────────


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards) from per-sequence summed log-probabilities; `*_tokens`: each
    side's answer-token count, which `ipo` averages over."""
    chosen_ratio = chosen_logps - reference_chosen
    rejected_ratio = rejected_logps - reference_rejected
    margin = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(margin)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(margin) + label_smoothing * F.logsigmoid(-margin)) \
            / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"module.loss_type={loss_type}: no such DPO loss")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards) from each side's log-probability per answer token."""
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, orpo_lambda: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair odds-ratio term, chosen rewards, rejected rewards): -lambda log sigmoid(log odds(chosen) - log
    odds(rejected)), odds p / (1 - p) of each side's log-probability per answer token; the NLL is added by the caller."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = -orpo_lambda * F.logsigmoid(log_odds)
    return losses, orpo_lambda * chosen_mean.detach(), orpo_lambda * rejected_mean.detach()


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                   rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch means trl logs (its `rewards/margins` and `rewards/accuracies` named in the singular)."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}


def sides(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) of per-sequence values: the first of each pair's two sequences, then the second; a packed
    row's trailing padding segment, where there is one, comes after them all."""
    pairs = batch["index"].size(0)
    return values[:pairs], values[pairs:2 * pairs]


# ── the module ────────────────────────────────────────────────────────────────────────────────────────────────────


def reference_kind(reference: str, model: nn.Module, loss_type: str = "sigmoid") -> str:
    if loss_type in REFERENCE_FREE:
        return "none"
    if reference != "auto":
        return reference
    return "adapter" if hasattr(model, "disable_adapter") else "copy"


def frozen_copy(model: nn.Module) -> nn.Module:
    """The model as it is now, frozen, in eval mode. Compiled layers (kernels.compile=layers) are made eager in the
    copy: their compiled call would be copied bound to the original layer, which then trains."""
    copy = deepcopy(model).requires_grad_(False).eval()
    for module in copy.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return copy


class DPOModule(FineTuningModule):
    """A causal LM trained on preference pairs with the DPO loss (module docstring). Logs train/ and val/ loss,
    rewards/{chosen,rejected,margin,accuracy} and logps/{chosen,rejected}.

    `reference`: auto (the adapter switched off for LoRA/QLoRA, a frozen copy for a full fine-tune), adapter, copy, or
    precomputed; none for the reference-free losses. `gamma` (simpo) and `orpo_lambda` (orpo): None is trl's
    default, 0.5 and 0.1. `loss`: tunelab's training loss (tunelab.kernels); where it is the fused one, the
    log-probabilities are computed the fused way too, with its chunk size."""

    def __init__(self, model: PreTrainedModel, optim: DictConfig, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, reference: str = "auto", sft_weight: float = 0.0,
                 gamma: float | None = None, orpo_lambda: float | None = None, adapter_only_checkpoints: bool = False,
                 loss=model_loss):
        super().__init__(model, optim, adapter_only_checkpoints, loss)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.sft_weight = sft_weight
        self.gamma = 0.5 if gamma is None else gamma
        self.orpo_lambda = 0.1 if orpo_lambda is None else orpo_lambda
        self.chunk_size = getattr(loss, "chunk_size", None)
        self.reference = reference_kind(reference, model, loss_type)
        if self.reference == "adapter" and not hasattr(model, "disable_adapter"):
            raise ValueError("module.reference=adapter needs an adapter to switch off: use peft=lora, or reference=auto")
        # In a list, not as a submodule: not trained, not in checkpoints (rebuilt from the same base on a resume),
        # not wrapped by DDP.
        self.frozen = [frozen_copy(model)] if self.reference == "copy" else []
        self.reference_table: dict[str, torch.Tensor] = {}  # reference=precomputed: split -> (pairs, 2)

    # ── one batch ──

    def pair_loss(self, batch: dict, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # chosen and rejected in one forward: a padded batch's chosen rows then its rejected rows, or a packed row's
        # segments in that order (tunelab.data.preference)
        policy = sequence_logps(self.model, batch, self.chunk_size, whole=self.loss_type == "orpo")
        chosen, rejected = sides(policy.answer, batch)
        chosen_tokens, rejected_tokens = sides(policy.answer_tokens, batch)
        if self.loss_type in REFERENCE_FREE:
            chosen_mean, rejected_mean = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
            if self.loss_type == "simpo":
                losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_mean, rejected_mean, self.beta, self.gamma)
            else:
                losses, chosen_rewards, rejected_rewards = orpo_odds_loss(chosen_mean, rejected_mean, self.orpo_lambda)
            metrics = reward_metrics(chosen_rewards, rejected_rewards, chosen_mean, rejected_mean)
        else:
            reference_chosen, reference_rejected = sides(self.reference_logps(batch, split).to(chosen), batch)
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, reference_chosen, reference_rejected,
                                                                self.beta, self.loss_type, self.label_smoothing,
                                                                chosen_tokens, rejected_tokens)
            metrics = reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        loss = losses.mean()
        if self.loss_type == "orpo":
            # ORPO's own NLL term, weight 1: the chosen rows' every token, averaged over the batch's
            whole, whole_tokens = sides(policy.whole, batch)[0], sides(policy.whole_tokens, batch)[0]
            nll = -whole.sum() / whole_tokens.sum().clamp(min=1)
            metrics["nll/chosen"] = nll.detach()
            loss = loss + nll
        elif self.sft_weight:
            # trl's `sft` loss term: the chosen answers' negative log-likelihood per token, over the whole batch
            nll = -chosen.sum() / chosen_tokens.sum().clamp(min=1)
            metrics["nll/chosen"] = nll.detach()
            loss = loss + self.sft_weight * nll
        return loss, metrics

    @torch.no_grad()
    def reference_logps(self, batch: dict, split: str) -> torch.Tensor:
        if self.reference == "precomputed":
            pairs = self.reference_table[split].to(batch["index"].device)[batch["index"]]
            return torch.cat([pairs[:, 0], pairs[:, 1]])
        if self.reference == "adapter":
            with self.model.disable_adapter():
                return sequence_logps(self.model, batch, self.chunk_size).answer
        return sequence_logps(self.frozen_model(), batch, self.chunk_size).answer

    def frozen_model(self) -> nn.Module:
        copy = self.frozen[0]
        if next(copy.parameters()).device != self.device:
            copy.to(self.device)
        return copy

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.pair_loss(batch, "train")
        self.log_step("train", {"loss": loss, **metrics}, batch["index"].size(0))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics = self.pair_loss(batch, "val")
        self.log_step("val", {"loss": loss, **metrics}, batch["index"].size(0), shown=("loss", "rewards/accuracy"))

    # ── precomputed reference log-probabilities ──

    def on_fit_start(self) -> None:
        for split in ("train", "val"):
            self.precompute_reference(split)

    def on_validation_start(self) -> None:
        self.precompute_reference("val")

    @torch.no_grad()
    def precompute_reference(self, split: str) -> None:
        """Every pair's reference log-probabilities (chosen, rejected) for one split, once, from the model as training
        finds it (its adapter off), before the first step of a run; a resumed run reads them from its checkpoint."""
        if self.reference != "precomputed" or split in self.reference_table:
            return
        datamodule = self.trainer.datamodule
        loader = datamodule.pairs_loader(split)
        table = torch.empty(len(loader.dataset), 2, dtype=torch.float64)
        was_training = self.model.training
        self.model.eval()
        adapter_off = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        with adapter_off, self.trainer.precision_plugin.forward_context():
            for batch in loader:
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                logps = sequence_logps(self.model, batch, self.chunk_size).answer.double().cpu()
                table[batch["index"].cpu()] = torch.stack(sides(logps, batch), dim=1)
        self.model.train(was_training)
        self.reference_table[split] = table

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference_table:
            checkpoint["dpo_reference_logps"] = dict(self.reference_table)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reference_table = dict(checkpoint.get("dpo_reference_logps", {}))

