"""strategy=fsdp starts a model too large to copy onto every rank: the whole model exists on rank 0 only (the other ranks
build it on the meta device), and each rank ends holding its shard (tests/fsdp2_memory_worker.py under torchrun)."""

import json
import subprocess
import sys

from tests.conftest import ROOT, subprocess_env


def test_only_rank_0_ever_holds_the_whole_model(tmp_path, dataset_cache):
    # llama1b's layers, 8 of them, under a small vocabulary: 0.5 B parameters (1.0 GB in bf16) in tensors of at most
    # 34 MB, so what a rank holds at its peak is its shards, not one large tensor in flight.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "tests/fsdp2_memory_worker.py", str(tmp_path), "llama1b", "model.config.num_hidden_layers=8",
               "model.config.vocab_size=4096"]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(tmp_path, dataset_cache), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    whole = ranks[0]["model_bytes"]
    assert whole > 0.9e9 and ranks[1]["model_bytes"] == whole
    for rank in ranks:
        assert rank["shard_bytes"] < 0.6 * whole  # half of it each, give or take the uneven last rows
    assert ranks[1]["peak_growth_bytes"] < 0.75 * whole  # its shard, and never the whole
    assert ranks[0]["peak_growth_bytes"] < 1.75 * whole  # the whole (built there) and its shard
