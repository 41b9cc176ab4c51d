"""The `data` group: rows → tokenized, prompt-masked examples (`formats`, `chat` for every assistant turn, `rows` for
data.max_length), padded or packed (`collators`), in a resumable order (`samplers`), served by a LightningDataModule
(`datamodule`; `stream_datamodule` over `streaming` and `streams` where data.streaming is true; `build` chooses)."""

from tunelab.data.chat import TemplateRewritesTurns, encode_chat, end_of_turn_ids
from tunelab.data.collators import InstructionCollator, PackedCollator, model_inputs
from tunelab.data.build import build_datamodule
from tunelab.data.datamodule import (InstructionDataModule, RandomTokenDataModule, load_rows,
                                     tiny_task_file)
from tunelab.data.formats import (IGNORE_INDEX, TOKENIZATION_VERSION, detect_format, split_prompt_answer,
                                  tokenize_example, tokenizer_fingerprint)
from tunelab.data.rows import RowTokenizer, fit_to_length, tokenize_row
from tunelab.data.samplers import (PackedBatchSampler, ResumableSampler, pack_in_order, resumable_sampler,
                                   resume_position)

__all__ = [
    "IGNORE_INDEX", "TOKENIZATION_VERSION", "InstructionCollator", "InstructionDataModule", "PackedBatchSampler",
    "PackedCollator", "RandomTokenDataModule", "ResumableSampler", "RowTokenizer", "TemplateRewritesTurns",
    "build_datamodule", "detect_format", "encode_chat", "end_of_turn_ids", "fit_to_length", "load_rows", "model_inputs",
    "pack_in_order", "resumable_sampler", "resume_position", "split_prompt_answer", "tiny_task_file", "tokenize_example",
    "tokenize_row", "tokenizer_fingerprint",
]
