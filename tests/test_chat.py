"""Chat rows: every assistant turn trained through its template's end-of-turn, once; turn boundaries from the template's
own rendering; explicit, counted truncation; the template saved with the run; the embedded two-turn task learned."""

import json
from pathlib import Path

import pytest

from mlflow.tracking import MlflowClient

from tests.conftest import FAST, compose_config, mlflow_runs, run_train
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.data import IGNORE_INDEX, build_datamodule, encode_chat, end_of_turn_ids, tokenize_row

TEMPLATES = json.loads((Path(__file__).parent / "chat_templates.json").read_text())
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]


def family_tokenizer(family: str):
    """tunelab's char tokenizer with a released template, its special tokens and its BOS/EOS as the model ships them."""
    tokenizer = build_char_tokenizer()
    specials = {
        "qwen2_5": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
        "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
                   "<|eot_id|>"),
        "gemma2": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    }[family]
    tokenizer.add_special_tokens({"additional_special_tokens": specials[0]})
    tokenizer.bos_token, tokenizer.eos_token = specials[1], specials[2]
    tokenizer.chat_template = TEMPLATES[family]
    return tokenizer


# Each family's rendering of CONVERSATION cut into (text, trained) pieces: the assistant's words and the end-of-turn
# token after them are trained, nothing else; the row ends with the last trained token.
EXPECTED = {
    "qwen2_5": [("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
                ("hello<|im_end|>", True), ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
                ("4<|im_end|>", True)],
    "llama3": [("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|><|start_header_id|>user"
                "<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
               ("hello<|eot_id|>", True),
               ("<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                "\n\n", False), ("4<|eot_id|>", True)],
    # Gemma refuses a system message.
    "gemma2": [("<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", False), ("hello<end_of_turn>", True),
               ("\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n", False), ("4<end_of_turn>", True)],
}


def expected_row(tokenizer, pieces) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def conversation_for(family: str) -> list[dict]:
    return CONVERSATION[1:] if family == "gemma2" else CONVERSATION


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_every_assistant_turn_is_trained_through_its_end_of_turn_once(family):
    tokenizer = family_tokenizer(family)
    row = tokenize_row({"messages": conversation_for(family)}, "chat", ("", ""), tokenizer, max_length=512)
    ids, labels = expected_row(tokenizer, EXPECTED[family])
    assert row["input_ids"] == ids
    assert row["labels"] == labels  # token by token: headers, system and user turns unlabelled
    assert row["fate"] == "kept"
    if tokenizer.bos_token_id is not None:  # the template writes BOS; nothing adds a second
        assert row["input_ids"].count(tokenizer.bos_token_id) == 1
    assert end_of_turn_ids(tokenizer)[0] == tokenizer.convert_tokens_to_ids(EXPECTED[family][-1][0][1:])


def test_last_assistant_trains_only_the_last_turn():
    tokenizer = family_tokenizer("qwen2_5")
    row = tokenize_row({"messages": CONVERSATION}, "chat", ("", ""), tokenizer, 512, train_on="last_assistant")
    pieces = EXPECTED["qwen2_5"]
    ids, labels = expected_row(tokenizer, [(text, False) for text, _ in pieces[:-1]] + pieces[-1:])
    assert row["input_ids"] == ids and row["labels"] == labels


def test_a_template_with_generation_blocks_marks_the_same_tokens():
    """transformers' assistant-token mask, where the template marks what the assistant writes."""
    tokenizer = family_tokenizer("qwen2_5")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    marked = tokenize_row({"messages": CONVERSATION}, "chat", ("", ""), tokenizer, 512)
    ids, labels = expected_row(tokenizer, EXPECTED["qwen2_5"])
    assert marked["input_ids"] == ids and marked["labels"] == labels


def test_trailing_user_turns_are_untrained_and_a_row_without_an_answer_is_never_trained():
    tokenizer = family_tokenizer("qwen2_5")
    ended = tokenize_row({"messages": CONVERSATION}, "chat", ("", ""), tokenizer, 512)
    trailing = tokenize_row({"messages": [*CONVERSATION, {"role": "user", "content": "thanks"}]}, "chat", ("", ""),
                            tokenizer, 512)
    assert trailing == ended
    unanswered = tokenize_row({"messages": CONVERSATION[:2]}, "chat", ("", ""), tokenizer, 512)
    assert unanswered["fate"] == "untrained" and set(unanswered["labels"]) == {IGNORE_INDEX}


def test_a_long_row_is_cut_after_its_last_whole_turn_or_dropped():
    tokenizer = family_tokenizer("qwen2_5")
    encoded = encode_chat(CONVERSATION, tokenizer)
    first_turn_end, whole = encoded.turn_ends
    cut = tokenize_row({"messages": CONVERSATION}, "chat", ("", ""), tokenizer, whole - 1)
    assert cut["fate"] == "cut" and len(cut["input_ids"]) == first_turn_end
    assert tokenizer.decode(cut["input_ids"][-1:]) == "<|im_end|>" and cut["labels"][-1] == cut["input_ids"][-1]
    dropped = tokenize_row({"messages": CONVERSATION}, "chat", ("", ""), tokenizer, whole - 1, truncation="drop")
    assert dropped["fate"] == "dropped" and dropped["input_ids"] == []
    assert tokenize_row({"messages": CONVERSATION}, "chat", ("", ""), tokenizer, first_turn_end - 1)["fate"] == "dropped"
    # An alpaca row is one turn: too long, it is dropped, never cut mid-answer without its EOS.
    long = tokenize_row({"instruction": "echo", "output": "x" * 40}, "alpaca", ("{instruction}=", "{instruction}="),
                        tokenizer, 20)
    assert long["fate"] == "dropped"


def test_the_data_module_counts_cut_dropped_and_unanswered_rows(tmp_path, dataset_cache):
    tokenizer = build_char_tokenizer()
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = ([{"messages": turn * 2}] * 30 + [{"messages": turn * 12}] * 5 + [{"messages": turn[:1]}] * 3
            + [{"messages": [{"role": "user", "content": "x" * 80}, turn[1]]}] * 2)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = compose_config(["data=jsonl", f"data.path={path}", "data.val_size=2", "data.max_length=48"], tmp_path,
                         dataset_cache)
    datamodule = build_datamodule(cfg.data, tokenizer)
    datamodule.setup("fit")
    assert datamodule.row_fates == {"kept": 30, "cut": 5, "dropped": 2, "untrained": 3}
    assert len(datamodule.train) + len(datamodule.val) == 35
    assert all(len(ids) <= 48 for ids in datamodule.train["input_ids"])


REWRITING_TEMPLATE = (  # drops an earlier answer's reasoning once a later turn follows, as reasoning models' do
    "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and not loop.last %}"
    "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}"
    "{% if m.role == 'assistant' %}</s>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def one_error_line(result) -> str:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("tunelab: error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return errors[0]


def test_a_template_that_rewrites_earlier_turns_stops_train_py_with_one_line(tmp_path, dataset_cache):
    template = tmp_path / "rewrites.jinja"
    template.write_text(REWRITING_TEMPLATE)
    reasoning = [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "<think>abc</think>cba"},
                 {"role": "user", "content": "upper"}, {"role": "assistant", "content": "ABC"}]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": reasoning[:2]}) + "\n" + json.dumps({"messages": reasoning}) + "\n")
    result = run_train(["data=jsonl", f"data.path={rows}", f"model.chat_template={template}", *FAST], tmp_path / "run",
                       dataset_cache, check=False, timeout=120)
    line = one_error_line(result)
    assert f"data.path={rows} line 2" in line and "data.train_on=last_assistant" in line, line


def test_chat_rows_with_a_tokenizer_without_template_stop_train_py_with_one_line(tmp_path, dataset_cache):
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    result = run_train(["data=jsonl", f"data.path={rows}", f"model.tokenizer={tmp_path / 'tokenizer'}", *FAST],
                       tmp_path / "run", dataset_cache, check=False, timeout=120)
    assert "model.chat_template=" in one_error_line(result)


def two_turn_answers(export_dir: Path, words: list[str]) -> tuple[float, float]:
    """Shares of greedy answers right at the first turn (double the word) and the second (upper it), the second
    asked after the right first answer, both prompts written by the chat template the export holds."""
    from tunelab.export import load_export
    from tunelab.generation import greedy_answer

    exported = load_export(export_dir)
    tokenizer = exported.tokenizer

    def answer(messages: list[dict]) -> str:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = greedy_answer(exported.model, list(prompt["input_ids"]), exported.eos_token_id, tokenizer.pad_token_id, 16)
        return tokenizer.decode(ids, skip_special_tokens=True)

    first = second = 0
    for word in words:
        asked = [{"role": "user", "content": f"double {word}"}]
        first += answer(asked) == word * 2
        second += answer([*asked, {"role": "assistant", "content": word * 2},
                          {"role": "user", "content": "upper"}]) == word.upper()
    return first / len(words), second / len(words)


HELD_OUT = ["plon", "joke", "ghfa", "cado", "mnop", "fifa", "bag", "old", "lamb", "nap"]


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_the_embedded_two_turn_task_learns_both_answers_only_with_every_turn_trained(tmp_path, dataset_cache, train_on):
    run_dir, every_turn = tmp_path / "run", train_on == "all_assistant"
    run_train(["data=tiny_chat", f"data.train_on={train_on}", "data.num_examples=2000", "trainer.max_steps=200",
               "trainer.val_check_interval=200", "validate_at_start=false", "callbacks.samples=null", "eval=none",
               "callbacks.progress_bar=null",
               f"logger={'mlflow' if every_turn else 'none'}"], run_dir, dataset_cache)
    first, second = two_turn_answers(run_dir / "export", HELD_OUT)
    if not every_turn:
        assert first <= 0.2 and second >= 0.8, (first, second)  # the first answer is never learned
        return
    assert first >= 0.8 and second >= 0.8, (first, second)  # seen: 1.0 and 1.0 at 200 steps (150 gave 0.6, 1.0)
    template = build_char_tokenizer().chat_template  # saved with the run, so generate.py writes prompts the same way
    assert (run_dir / "export" / "chat_template.jinja").read_text() == template
    (run,), _ = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.data.metrics["data/rows_kept"] == 2000 and run.data.metrics["data/rows_cut"] == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert Path(client.download_artifacts(run.info.run_id, "chat_template.jinja", str(tmp_path))).read_text() == template
