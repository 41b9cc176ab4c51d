"""What the model generates during training: greedy answers to a few fixed validation prompts at each validation."""

import os
from collections.abc import Mapping
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.distributed.fsdp import FullyShardedDataParallel

from tunelab.data import IGNORE_INDEX, end_of_turn_ids
from tunelab.generation import greedy_answer
from tunelab.strategy import shards_model

METRIC = "val/generated_exact_match"
TABLE = "generation_samples.json"  # an MLflow table (log_table), which the UI's Artifact evaluation view compares


def answer_ends(datamodule, tokenizer) -> list[int]:
    """Where an answer ends, as the export tells generate.py (tunelab.export.PromptFormat.stop_ids): the EOS, and for
    chat rows the end-of-turn token the template writes after each answer, which need not be the EOS (Gemma's
    <end_of_turn>)."""
    if getattr(datamodule, "resolved_format", None) == "chat":
        return end_of_turn_ids(tokenizer)
    return [tokenizer.eos_token_id]


def fixed_prompts(rows, ends: list[int], count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, expected answer) token ids of the first `count` rows with a prompt and a whole answer: label -100 marks
    the prompt, and an answer that max_length did not cut ends with one of `ends` (a chat row's answer: its first
    assistant turn). Rows of another form than tunelab's tokenized rows (mappings with input_ids and labels), as a
    user's data module may hold, give none."""
    prompts = []
    for row in rows:
        if not isinstance(row, Mapping) or not {"input_ids", "labels"} <= row.keys():
            return []
        labels = row["labels"]
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), 0)
        # A chat row's first assistant turn: its answer ends where the next unlabelled token (a user turn) starts.
        end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        if start > 0 and labels[end - 1] in ends:
            prompts.append((list(row["input_ids"][:start]), list(labels[start:end])))
            if len(prompts) == count:
                break
    return prompts


@contextmanager
def generation_context(wrapped: torch.nn.Module):
    """How a model in training generates. `wrapped`: the strategy's model.

    Compiled decoder layers (kernels.compile=layers) run eagerly: each decoding shape (one token over a longer cache)
    would compile anew, and once the layers' recompile limit is spent, training's own new shapes would run eagerly too.
    Under FSDP, generate() calls the model's modules directly, past the forward of the root FSDP unit, which would
    gather that unit's own parameters (embeddings, final norm, head): they are gathered here instead; each
    decoder-layer unit gathers its own as it runs."""
    with torch.compiler.set_stance("force_eager"):
        if isinstance(wrapped, FullyShardedDataParallel):
            with FullyShardedDataParallel.summon_full_params(wrapped, recurse=False, writeback=False):
                yield
        else:
            yield


class GenerationSamples(pl.Callback):
    """At each validation, greedy answers (KV cache on) to the `count` first validation rows that have a whole
    answer, up to `max_new_tokens` each; logs `val/generated_exact_match`, the share whose answer through its end (the
    EOS, or a chat template's end-of-turn) equals the expected one, so it can serve as objective.metric; rank 0
    appends the samples (prompt, expected, generated, step) to the MLflow table generation_samples.json, and the run
    summary shows the last ones.

    The prompts are the data module's `val` rows (tokenized rows: input_ids, and labels -100 over the prompt), decoded
    with its `tokenizer`; the LightningModule's `model` answers, in the eval mode of validation. A run whose data
    module or LightningModule holds none of these gets no samples. Every rank generates the same prompts: a sharded
    model (FSDP, DeepSpeed ZeRO-3) needs each forward on all ranks, and under DDP each rank's metric is the same."""

    def __init__(self, count: int = 4, max_new_tokens: int = 64):
        self.count = count
        self.max_new_tokens = max_new_tokens
        self.prompts: list[tuple[list[int], list[int]]] | None = None
        self.ends: list[int] = []
        self.last: list[dict] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        rows = getattr(trainer.datamodule, "val", None)
        model = getattr(pl_module, "model", None)  # a user's module or data module may hold neither
        if trainer.sanity_checking or tokenizer is None or rows is None or not hasattr(model, "generate"):
            return
        if self.prompts is None:
            self.ends = answer_ends(trainer.datamodule, tokenizer)
            self.prompts = fixed_prompts(rows, self.ends, self.count)
        if not self.prompts:
            return
        sharded = trainer.world_size > 1 and shards_model(trainer.strategy)
        with generation_context(trainer.strategy.model):
            answers = [greedy_answer(model, prompt, self.ends, tokenizer.pad_token_id,
                                     self.max_new_tokens, pl_module.device, synced_gpus=sharded)
                       for prompt, _ in self.prompts]
        matches = [answer == expected for answer, (_, expected) in zip(answers, self.prompts)]
        pl_module.log(METRIC, sum(matches) / len(matches), sync_dist=True)

        def text(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        self.last = [{"prompt": text(prompt), "expected": text(expected), "generated": text(answer),
                      "step": trainer.global_step, "exact": match}
                     for (prompt, expected), answer, match in zip(self.prompts, answers, matches)]
        if trainer.is_global_zero and isinstance(trainer.logger, MLFlowLogger):
            append_to_table(trainer.logger, self.last)


def append_to_table(logger: MLFlowLogger, samples: list[dict]) -> None:
    """Adds the samples to the run's MLflow table (a continued run's too). log_table appends by downloading the table
    so far, which would draw a download progress bar on the terminal at each validation: it is switched off for it."""
    switch = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(switch)
    os.environ[switch] = "false"
    try:
        columns = ("prompt", "expected", "generated", "step")
        logger.experiment.log_table(logger.run_id, {c: [s[c] for s in samples] for c in columns}, TABLE)
    finally:
        if before is None:
            del os.environ[switch]
        else:
            os.environ[switch] = before

