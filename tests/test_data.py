"""Instruction data: prompt and padding masked out of the loss, dynamic padding, formats, seeded split, caching."""

import json

import pytest
import torch

from tests.conftest import compose_config
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.data import IGNORE_INDEX, InstructionCollator, build_datamodule, ResumableSampler, tokenize_example


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


def make_datamodule(tmp_path, cache, tokenizer, *overrides):
    cfg = compose_config(["data.num_examples=300", *overrides], tmp_path, cache)
    datamodule = build_datamodule(cfg.data, tokenizer)
    datamodule.setup("fit")
    return datamodule


def test_prompt_and_padding_are_masked_answer_is_not(tmp_path, dataset_cache, tokenizer):
    datamodule = make_datamodule(tmp_path, dataset_cache, tokenizer)
    rows = [datamodule.train[i] for i in range(8)]
    batch = InstructionCollator(tokenizer.pad_token_id)(rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        labels = batch["labels"][i]
        text = tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        prompt_len = 1 + len(text.split("=")[0] + "=")  # BOS + one token per character
        assert (labels[:prompt_len] == IGNORE_INDEX).all(), text
        answer_ids = batch["input_ids"][i, prompt_len:n]
        assert torch.equal(labels[prompt_len:n], answer_ids), text  # answer and EOS are learned
        assert labels[n - 1] == tokenizer.eos_token_id
        assert (labels[n:] == IGNORE_INDEX).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()


def test_batches_pad_to_their_own_longest_row(tokenizer):
    short = tokenize_example("a=", "b", tokenizer, 64, add_bos=True)
    long = tokenize_example("reverse abcdef=", "fedcba", tokenizer, 64, add_bos=True)
    collate = InstructionCollator(tokenizer.pad_token_id)
    assert collate([short, short])["input_ids"].shape == (2, len(short["input_ids"]))
    assert collate([short, long])["input_ids"].shape == (2, len(long["input_ids"]))


def test_jsonl_file_in_alpaca_and_chat_format(tmp_path, dataset_cache, tokenizer):
    alpaca, chat = tmp_path / "alpaca.jsonl", tmp_path / "chat.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": "echo", "input": f"w{i}", "output": f"w{i}"}) + "\n" for i in range(40)))
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(40)))
    for path, marker in ((alpaca, "echo"), (chat, "<user>")):
        datamodule = make_datamodule(tmp_path, dataset_cache, tokenizer, "data=jsonl", f"data.path={path}", "data.val_size=4")
        assert len(datamodule.train) == 36 and len(datamodule.val) == 4
        assert marker in tokenizer.decode(datamodule.train[0]["input_ids"])


def test_split_is_seeded(tmp_path, dataset_cache, tokenizer):
    first = make_datamodule(tmp_path, dataset_cache, tokenizer, "seed=7").val["input_ids"]
    again = make_datamodule(tmp_path, dataset_cache, tokenizer, "seed=7").val["input_ids"]
    other = make_datamodule(tmp_path, dataset_cache, tokenizer, "seed=8").val["input_ids"]
    assert first == again and first != other


def test_second_run_reuses_the_tokenized_cache(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    first = make_datamodule(tmp_path, cache, tokenizer).tokenized()
    files = {f["filename"] for f in first.cache_files}
    mtimes = {f: (tmp_path / f).stat().st_mtime_ns for f in files}
    second = make_datamodule(tmp_path, cache, tokenizer).tokenized()
    assert {f["filename"] for f in second.cache_files} == files
    assert any("cache-" in f for f in files)  # the map() output, not only the raw arrow file
    assert all((tmp_path / f).stat().st_mtime_ns == m for f, m in mtimes.items())


def test_sampler_resumes_mid_epoch_and_shards_ranks():
    full = list(ResumableSampler(100, seed=3))
    resumed = ResumableSampler(100, seed=3)
    resumed.skip = 40
    assert list(resumed) == full[40:]
    assert list(resumed) == full  # the skip applies to one pass only
    ranks = [list(ResumableSampler(100, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 50
