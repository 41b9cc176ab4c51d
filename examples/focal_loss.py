"""A LightningModule of your own: tunelab's causal-LM module with focal loss in training_step.

    PYTHONPATH=examples python train.py module._target_=focal_loss.FocalLossModule +module.gamma=2.0

Focal loss (Lin et al., 2017) weighs each answer token's cross-entropy by (1 - p)^gamma, p the probability the model
gives the right token: tokens it already predicts well count less, hard ones more; gamma=0 is plain cross-entropy.
Everything else (validation on val/loss and val/exact_match, the optimizer and schedule, checkpoints, LoRA) is
CausalLMModule's, so runs stay comparable by their objective. This step computes the logits whole: the fused loss of
kernels=auto on GPUs (the `loss` argument) is not used here.
"""

import torch

from tunelab.data import IGNORE_INDEX, model_inputs
from tunelab.modules.causal_lm import CausalLMModule


class FocalLossModule(CausalLMModule):
    def __init__(self, *args, gamma: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma = gamma

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs = {key: value for key, value in model_inputs(batch).items() if key != "labels"}
        logits = self.model(**inputs, use_cache=False).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        answer = targets != IGNORE_INDEX
        log_p = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        cross_entropy = -log_p
        focal = (1 - log_p.exp()) ** self.gamma * cross_entropy
        count = answer.sum().clamp(min=1)
        loss = (focal * answer).sum() / count
        size = batch["input_ids"].size(0)
        # train/loss is what the run optimises (the loss curve, divergence checks and summary read it);
        # train/cross_entropy is the plain loss of the same step, to compare with runs of the default module.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        self.log("train/cross_entropy", (cross_entropy * answer).sum() / count, on_step=True, on_epoch=False,
                 batch_size=size)
        return loss
