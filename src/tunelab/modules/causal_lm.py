"""module=causal_lm: a causal LM trained on its answer tokens and validated on loss and exact match (CausalLMModule)."""

import torch

from tunelab.data import IGNORE_INDEX, model_inputs
from tunelab.modules.base import FineTuningModule


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: 1.0 when every answer token is the argmax prediction (teacher-forced), which is exactly when
    greedy decoding from the prompt reproduces the answer."""
    predictions = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    correct = (predictions == targets) | ~answer
    return correct.all(dim=1).float()


class CausalLMModule(FineTuningModule):
    """`loss`: a callable (model, batch) -> training loss; one with an `evaluate(model, batch)` method (tunelab.kernels'
    fused loss) also computes validation loss and per-row exact match without materialising the logits."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.model, batch)
        self.log_step("train", {"loss": loss}, batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        source = batch.pop("source", None)  # a mix's validation batch holds one source's rows (tunelab.data.mixing)
        if hasattr(self.loss, "evaluate"):
            loss, matches = self.loss.evaluate(self.model, batch)
        else:
            outputs = self.model(**model_inputs(batch), use_cache=False)
            loss, matches = outputs.loss, exact_match(outputs.logits, batch["labels"])
        values = {"loss": loss, "exact_match": matches.mean()}
        if source is not None:
            values |= {f"loss/{source}": loss, f"exact_match/{source}": matches.mean()}
        self.log_step("val", values, batch["input_ids"].size(0), shown=("loss", "exact_match"))
