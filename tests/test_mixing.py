"""Weighted mixing (data.sources): each epoch draws the sources in the weights' proportions, reproducibly from the seed;
a mixed, packed run resumes mid-epoch exactly; each source is validated (val/loss/<name>) and logged as an MLflow input;
bad mixes end in one line."""

import json
import random
from collections import Counter
from pathlib import Path

import mlflow
import pytest

from tests.conftest import FAST, compose_config, run_train
from tunelab.config import ConfigError, validate_config
from tunelab.data import build_datamodule
from tunelab.data.mixing import MixedOrder
from tunelab.data.samplers import ResumableSampler
from tunelab.inputs import check_inputs, load_tokenizer
from tunelab.tiny_task import LETTERS, OPERATIONS

N = 10


def write_task(path: Path, operation: str, rows: int, seed: int) -> Path:
    """A JSON-lines file of one operation of the embedded task (alpaca rows)."""
    rng = random.Random(seed)
    with path.open("w") as file:
        for _ in range(rows):
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
            file.write(json.dumps({"instruction": operation, "input": word, "output": OPERATIONS[operation](word)}) + "\n")
    return path


def two_sources(tmp_path: Path, weights=(3, 1), rows=(300, 200)) -> str:
    """`+data.sources` over a `reverse` file and an `upper` file."""
    rev = write_task(tmp_path / "reverse.jsonl", "reverse", rows[0], 1)
    up = write_task(tmp_path / "upper.jsonl", "upper", rows[1], 2)
    return (f"+data.sources=[{{name:rev,path:'{rev}',weight:{weights[0]}}},"
            f"{{name:up,path:'{up}',weight:{weights[1]}}}]")


def test_an_epoch_draws_each_source_in_its_weights_share(tmp_path, dataset_cache):
    order = MixedOrder(sizes=[300, 50, 150], weights=[0.5, 0.3, 0.2], seed=7)
    offsets = [0, 300, 350, 500]
    for epoch in range(3):
        drawn = order(epoch)
        per_source = Counter(next(i for i in range(3) if offsets[i] <= index < offsets[i + 1]) for index in drawn)
        # Exact to one row (largest remainders): 250, 150, 100 of the 500 rows.
        assert [per_source[i] for i in range(3)] == [250, 150, 100]
        # The 50-row source gives each of its rows three times an epoch.
        assert set(Counter(i for i in drawn if 300 <= i < 350).values()) == {3}
    # The 300-row source gives 250 an epoch, going through all its rows before any repeats: 5 times each in 6 epochs.
    assert max(Counter(i for i in order(0) if i < 300).values()) == 1
    assert set(Counter(i for epoch in range(6) for i in order(epoch) if i < 300).values()) == {5}
    assert order(0) == MixedOrder([300, 50, 150], [0.5, 0.3, 0.2], seed=7)(0) != order(1)
    assert set(order(0)[:250]) != set(order(1)[:250])  # the 300-row source goes on where epoch 0 stopped

    # Through the data module, split across two ranks: the rows trained on are the sources' in the weights' shares.
    cfg = compose_config(["data=tiny", two_sources(tmp_path, weights=(1, 3))], tmp_path / "run", dataset_cache)
    dm = build_datamodule(cfg.data, load_tokenizer(cfg.model))
    dm.setup("fit")
    ranks = [list(ResumableSampler(len(dm.train), dm.seed, 2, rank, order=dm.train_order)) for rank in (0, 1)]
    prompts = Counter(dm.tokenizer.decode(dm.train[index]["input_ids"][1:4]) for rank in ranks for index in rank)
    assert abs(prompts["upp"] / sum(prompts.values()) - 0.75) < 0.01, prompts  # tolerance: 1% of the epoch
    assert set(prompts) == {"upp", "rev"}


def test_a_mixed_packed_run_resumed_mid_epoch_matches_a_straight_run(tmp_path, dataset_cache):
    common = [*FAST, two_sources(tmp_path), "objective.metric=val/loss/up", "data.packing=true", "data.pack_tokens=256",
              f"trainer.val_check_interval={N}", f"optim.total_steps={2 * N}", "export=false", "trainer.log_every_n_steps=2"]
    straight, resumed = f"sqlite:///{tmp_path / 'straight.db'}", f"sqlite:///{tmp_path / 'resumed.db'}"
    run_train([*common, f"trainer.max_steps={2 * N}"], tmp_path / "straight", dataset_cache, straight)
    run_train([*common, f"trainer.max_steps={N}"], tmp_path / "resumed", dataset_cache, resumed)
    run_train([*common, f"trainer.max_steps={2 * N}", "ckpt_path=last"], tmp_path / "resumed", dataset_cache, resumed)

    def histories(uri: str) -> tuple[mlflow.entities.Run, dict]:
        client = mlflow.MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id], order_by=["start_time DESC"])[0]
        keys = ("train/loss", "val/loss", "val/loss/rev", "val/loss/up", "val/exact_match/up")
        return run, {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in keys}

    straight_run, straight_metrics = histories(straight)
    resumed_run, resumed_metrics = histories(resumed)
    # The resumed run restored step N: its train/loss starts after it, and it did not validate again at N.
    assert min(resumed_metrics["train/loss"]) >= N and N not in resumed_metrics["val/loss"]
    for key in ("train/loss", "val/loss", "val/loss/rev", "val/loss/up"):
        for step, value in resumed_metrics[key].items():
            assert value == pytest.approx(straight_metrics[key][step], rel=1e-5, abs=1e-6), (key, step)
    # Per source: logged at step 0 and each validation; overall val/loss is their rows' weighted mean (15 + 10 rows).
    assert sorted(straight_metrics["val/loss/up"]) == sorted(straight_metrics["val/loss"]) == [0, N - 1, 2 * N - 1]
    for step, loss in straight_metrics["val/loss"].items():
        rev, up = straight_metrics["val/loss/rev"][step], straight_metrics["val/loss/up"][step]
        assert loss == pytest.approx((15 * rev + 10 * up) / 25, rel=1e-5)
    # objective.metric=val/loss/up: the run returns and records the best of that source after step 0.
    assert straight_run.data.metrics["objective"] == min(v for s, v in straight_metrics["val/loss/up"].items() if s > 0)
    # Each source is an MLflow dataset input of its own, training and validation, with its weight.
    inputs = {(i.dataset.name, next(t.value for t in i.tags if t.key == "mlflow.data.context")): json.loads(i.dataset.profile)
              for i in straight_run.inputs.dataset_inputs}
    assert inputs == {("rev", "training"): {"num_rows": 285, "weight": 3.0}, ("rev", "validation"): {"num_rows": 15, "weight": 3.0},
                      ("up", "training"): {"num_rows": 190, "weight": 1.0}, ("up", "validation"): {"num_rows": 10, "weight": 1.0}}


def bad_mix(tmp_path, *entries: str) -> list[str]:
    return ["data=tiny", "+data.sources=[" + ",".join(entries) + "]"]


def test_bad_mixes_end_in_one_line(tmp_path, dataset_cache):
    rev = write_task(tmp_path / "reverse.jsonl", "reverse", 40, 1)
    (tmp_path / "empty.jsonl").write_text("")
    ok = f"{{name:rev,path:'{rev}'}}"
    cases = [
        (bad_mix(tmp_path, ok, f"{{name:up,path:'{rev}',weight:-1}}"), "data.sources[1].weight=-1 must be a number >= 0"),
        (bad_mix(tmp_path, f"{{name:rev,path:'{rev}',weight:0}}", f"{{name:up,path:'{rev}',weight:0}}"),
         "data.sources: every weight is 0, so nothing is trained on"),
        (bad_mix(tmp_path, ok, f"{{name:up,path:'{rev}',format:xml}}"), "data.sources[1].format=xml is not one of: "),
        (bad_mix(tmp_path, ok, f"{{name:up,path:'{tmp_path}/missing.jsonl'}}"), f"data.sources[1].path={tmp_path}/missing.jsonl: no such file"),
        (bad_mix(tmp_path, ok, f"{{name:up,path:'{tmp_path}/empty.jsonl'}}"), f"data.sources[1].path={tmp_path}/empty.jsonl holds no rows"),
        (bad_mix(tmp_path, ok, f"{{name:rev,path:'{rev}'}}"), "data.sources[1].name=rev names two sources"),
        (bad_mix(tmp_path, ok, f"{{name:'a/b',path:'{rev}'}}"), "data.sources[1].name=a/b: give each source a name of letters"),
        (bad_mix(tmp_path, ok, f"{{name:up,path:'{rev}',weigth:2}}"), "data.sources[1] has a key weigth: the keys of a source are"),
        (["data=mix"], "data.sources is not given: data=mix needs data.sources="),
        ([*bad_mix(tmp_path, ok, f"{{name:up,path:'{rev}'}}"), "objective.metric=val/loss/down"],
         "objective.metric=val/loss/down is not one of: val/loss, "),
        (["data.val_size=1.5"], "data.val_size=1.5 is neither a fraction of the rows (< 1, e.g. 0.05) nor a number of rows"),
    ]
    for args, message in cases:
        cfg = compose_config(args, tmp_path / "run", dataset_cache)
        with pytest.raises(ConfigError) as refused:
            validate_config(cfg)
            check_inputs(cfg, load_tokenizer(cfg.model))
        assert message in str(refused.value) and "\n" not in str(refused.value), (message, str(refused.value))


def test_an_unknown_attention_is_one_short_line_naming_the_choices(tmp_path, dataset_cache):
    cfg = compose_config(["model.attn_implementation=no_such_attention"], tmp_path / "run", dataset_cache)
    with pytest.raises(ConfigError) as refused:
        check_inputs(cfg, load_tokenizer(cfg.model))
    line = str(refused.value)
    assert line.startswith("model.attn_implementation=no_such_attention is not an attention transformers has: use sdpa")
    assert len(f"tunelab: error: {line}") < 200 and "eager" in line and "flash_attention_2" in line


CHAT = {"messages": [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}]}


@pytest.mark.parametrize("row, message", [
    ({"messages": [["user", "reverse abc"], ["assistant", "cba"]]},
     'line 21 has message 1 ["user", "reverse abc"], which is not a role and a content string'),
    ({"messages": [{"role": "robot", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}]},
     'line 21 has message 1 with role "robot": a role is one of system, user, assistant, tool'),
], ids=["not role/content pairs", "unknown role"])
def test_a_bad_chat_row_in_a_source_ends_train_py_with_one_line(tmp_path, dataset_cache, row, message):
    rev = write_task(tmp_path / "reverse.jsonl", "reverse", 40, 1)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [CHAT] * 20 + [row]))
    args = bad_mix(tmp_path, f"{{name:rev,path:'{rev}'}}", f"{{name:chat,path:'{tmp_path}/chat.jsonl'}}")
    result = run_train(args, tmp_path / "run", dataset_cache, check=False, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines[-1].startswith(f"tunelab: error: data.sources[1].path={tmp_path}/chat.jsonl {message}"), lines[-1]
