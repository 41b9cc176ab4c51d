"""The data preview (preview.py, and data_preview.txt in each run): training rows decoded with exactly their trained
tokens marked, the length distribution, the mix's shares and the packed rows' fill."""

import re
import subprocess
import sys

import mlflow

from tests.conftest import FAST, ROOT, run_train, subprocess_env
from tests.test_mixing import two_sources
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.data import IGNORE_INDEX
from tunelab.data.preview import marked_text
from tunelab.tiny_task import OPERATIONS

# A row of the embedded task as the char tokenizer decodes it: BOS, the prompt, then « the answer and EOS » trained.
ROW = re.compile(r"<s>(reverse|upper|double) ([a-p]+)=«(.*)</s>»")
UNMARKED = re.compile(r"<s>(reverse|upper|double) ([a-p]+)=(.*)</s>")


def preview(tmp_path, cache, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "preview.py"), f"hydra.run.dir={tmp_path / 'preview'}", *args],
                            cwd=ROOT, env=subprocess_env(tmp_path, cache), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout[result.stdout.index("── first"):]  # after the log lines of setting the data up


def assert_rows_marked(lines: list[str]) -> int:
    """Every example line is prompt, then exactly the answer and EOS marked (what labels != -100 covers); returns how
    many there were."""
    for line in lines:
        match = ROW.fullmatch(line.strip())
        assert match, line
        operation, word, answer = match.groups()
        assert answer == OPERATIONS[operation](word), line
    return len(lines)


def example_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("  <s>")]


def test_trained_spans_are_marked_exactly_where_labels_are_not_ignored():
    tokenizer = build_char_tokenizer()
    ids = tokenizer("abcdefg", add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX, *ids[1:3], IGNORE_INDEX, IGNORE_INDEX, ids[5], IGNORE_INDEX]
    assert marked_text(ids, labels, tokenizer) == "a«bc»de«f»g"
    assert marked_text(ids, ids, tokenizer) == "«abcdefg»"
    assert marked_text(ids, labels, tokenizer, colour=True) == "a\x1b[32m«bc»\x1b[0mde\x1b[32m«f»\x1b[0mg"


def test_preview_of_the_embedded_task(tmp_path, dataset_cache):
    text = preview(tmp_path, dataset_cache, "data.num_examples=400", "+rows=3")
    assert text.count("\nrow ") == 3 and text.startswith("── first 3 training rows")
    assert assert_rows_marked(example_lines(text)) == 3
    assert re.search(r"lengths \(tokens, 380 training rows\): min \d+  median \d+  p90 \d+", text)
    assert "packing" not in text and "mix per epoch" not in text
    # The share of trained tokens over the 380 training rows, counted from the rows' text: each row's answer and EOS.
    answers, tokens = trained_share_of_the_embedded_task(tmp_path, dataset_cache, "data.num_examples=400")
    assert f"trained tokens: {answers / tokens:.1%} of all tokens" in text
    assert 0.2 < answers / tokens < 0.5


def trained_share_of_the_embedded_task(tmp_path, cache, *args: str) -> tuple[int, int]:
    """(answer tokens with their EOS, all tokens) over the training rows of the embedded task: a character a token."""
    from tests.conftest import compose_config
    from tunelab.data import build_datamodule

    cfg = compose_config(list(args), tmp_path / "composed", cache)
    tokenizer = build_char_tokenizer()
    datamodule = build_datamodule(cfg.data, tokenizer)
    datamodule.prepare_data()
    datamodule.setup("fit")
    answers = tokens = 0
    for ids in datamodule.train["input_ids"]:
        operation, word, answer = UNMARKED.fullmatch(tokenizer.decode(ids, skip_special_tokens=False)).groups()
        assert answer == OPERATIONS[operation](word)
        answers, tokens = answers + len(answer) + 1, tokens + len(ids)
    return answers, tokens


def test_preview_of_a_packed_two_source_mix(tmp_path, dataset_cache):
    text = preview(tmp_path, dataset_cache, two_sources(tmp_path), "data.packing=true", "data.pack_tokens=96", "+rows=2")
    assert assert_rows_marked(example_lines(text)) >= 6  # two packed rows of 4 or 5 examples each
    assert "mix per epoch: rev 356 rows (75%, weight 3), up 119 rows (25%, weight 1)" in text
    fill = re.search(r"packing: (\d+) rows of 96 tokens an epoch, ([\d.]+)% full", text)
    assert fill and 80 < float(fill.group(2)) <= 100



def test_a_preview_leaves_no_run_directory_behind(tmp_path, dataset_cache):
    result = subprocess.run([sys.executable, str(ROOT / "preview.py"), "+rows=1"], cwd=tmp_path,
                            env=subprocess_env(tmp_path, dataset_cache), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "row 1 (" in result.stdout, result.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "preview.py"), "data.max_length=1"], cwd=tmp_path,
                         env=subprocess_env(tmp_path, dataset_cache), capture_output=True, text=True, timeout=300)
    assert bad.stderr.strip().endswith("tunelab: error: data.max_length=1 must be >= 2")
    assert not (tmp_path / "outputs").exists()

def test_a_run_logs_its_preview_as_an_mlflow_artifact(tmp_path, dataset_cache):
    run_train([*FAST, "trainer.max_steps=1", "validate_at_start=false", "export=false", "callbacks.samples=null"],
              tmp_path / "run", dataset_cache)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])[0]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data_preview.txt",
                                               tracking_uri=uri, dst_path=str(tmp_path))
    with open(path) as file:
        content = file.read()
    assert content.startswith("── first 8 training rows") and assert_rows_marked(example_lines(content)) == 8
