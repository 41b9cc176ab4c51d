"""A fast command line: `--help` and a config error end before torch, Lightning or any other heavy package is
imported (issue 13; benchmarks/cli_startup.py measures the time)."""

import pytest
from conftest import run_train

from tunelab.strategy import LIGHTNING_STRATEGIES, may_have_gpus

HEAVY = {"torch", "lightning", "transformers", "peft", "mlflow", "datasets"}


def run_listing_imports(args: list[str], tmp_path, dataset_cache) -> tuple[str, list[str], set[str]]:
    """train.py's stdout, the stderr lines that are its own, and the top-level packages it imported
    (`python -X importtime`, through its environment variable, lists each import on stderr)."""
    result = run_train(args, tmp_path / "run", dataset_cache, check=False, extra_env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    own = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("import time:")]
    assert imported, "no import listed: -X importtime did not take"
    return result.stdout, own, imported


@pytest.mark.parametrize("flag, says", [("--help", "== Configuration groups =="), ("--hydra-help", "== Flags ==")])
def test_help_imports_nothing_heavy(tmp_path, dataset_cache, flag, says):
    stdout, own_stderr, imported = run_listing_imports([flag], tmp_path, dataset_cache)
    assert says in stdout and not own_stderr
    assert not HEAVY & imported


def test_config_error_is_one_line_before_anything_heavy_is_imported(tmp_path, dataset_cache):
    stdout, own_stderr, imported = run_listing_imports(["optim.lr=-1"], tmp_path, dataset_cache)
    assert own_stderr == ["tunelab: error: optim.lr=-1 must be > 0"] and not stdout
    assert not HEAVY & imported


@pytest.mark.skipif(may_have_gpus(), reason="where a GPU can be, counting them takes torch")
def test_placement_error_counts_no_gpus_without_torch(tmp_path, dataset_cache):
    stdout, own_stderr, imported = run_listing_imports(["strategy=fsdp8"], tmp_path, dataset_cache)
    assert own_stderr == ["tunelab: error: strategy fsdp8 needs 8 GPUs, found 0"]
    assert not HEAVY & imported


def test_strategy_names_known_without_lightning_are_lightnings_registry():
    from lightning.pytorch.strategies import StrategyRegistry

    assert sorted(LIGHTNING_STRATEGIES) == sorted(StrategyRegistry.available_strategies())
