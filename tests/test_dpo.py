"""DPO (module=dpo, tunelab.modules.dpo) on preference pairs (tunelab.data.preference): equal to trl's DPOTrainer on the same
batch, learning the embedded preference task from an SFT export, resuming and scaling out like SFT, and refusing bad
pairs and keys with one line."""

import copy
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import compose_config, logged, run_train

PAIRS = [
    {"prompt": "reverse", "input": "abc", "chosen": "cba", "rejected": "abd"},
    {"prompt": "upper", "input": "hello", "chosen": "HELLO", "rejected": "hellohello"},
    {"prompt": "double", "input": "ok", "chosen": "okok", "rejected": "OK"},
]


def tiny_model(tmp_path, dataset_cache, peft: str):
    """The embedded model in float64, a LoRA adapter on it where `peft`, with the char tokenizer."""
    from tunelab.char_tokenizer import build_char_tokenizer
    from tunelab.model import build_model
    from tunelab.peft import apply_peft

    tokenizer = build_char_tokenizer()
    cfg = compose_config([f"peft={peft}", "peft.lora_dropout=0.0"] if peft != "none" else [], tmp_path, dataset_cache)
    torch.manual_seed(0)
    model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer).double(), cfg.peft)
    return model, tokenizer, cfg


def tokenized_pairs(tokenizer) -> list[dict]:
    from tunelab.data.preference import PairTokenizer

    tokenize = PairTokenizer("alpaca", ("{instruction} {input}=", "{instruction}="), tokenizer, max_length=48)
    return [{**tokenize(pair), "index": i} for i, pair in enumerate(PAIRS)]


def pair_batch(tokenizer) -> dict:
    from tunelab.data.preference import PreferenceCollator

    return PreferenceCollator(tokenizer.pad_token_id)(tokenized_pairs(tokenizer))


def packed_pair_batch(tokenizer, spare: int = 5) -> dict:
    """The PAIRS in one packed row (data.packing=true), `spare` tokens of padding after them."""
    from tunelab.data.preference import PackedPairCollator, pair_lengths

    pairs = tokenized_pairs(tokenizer)
    used = sum(pair_lengths({key: [p[key] for p in pairs] for key in ("input_ids", "rejected_input_ids")}))
    return PackedPairCollator(tokenizer.pad_token_id, used + spare)(pairs)


@torch.no_grad()
def move_policy_away(model) -> None:
    """The policy differs from its reference: random LoRA B matrices (zero at init), or noise on a full model's weights."""
    generator = torch.Generator().manual_seed(1)
    adapter = hasattr(model, "disable_adapter")
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ("lora_B" in name or not adapter):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def trl_oracle(policy, reference, batch: dict, beta: float, loss_type: str, label_smoothing: float,
               sft_weight: float = 0.0):
    """trl's own DPO loss and metrics (DPOTrainer._compute_loss, trl >= 1.0) on the same batch: a DPOTrainer given only
    the attributes that method reads, trl's fused LM head on a copy of each model, and the reference as trl gets it
    (the adapter switched off where `reference` is None)."""
    from accelerate import Accelerator
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    def fused(model):
        model = copy.deepcopy(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        return model

    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.model, trainer.ref_model = fused(policy), (fused(reference) if reference is not None else None)
    trainer.accelerator = Accelerator(cpu=True)
    trainer.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    trainer.precompute_ref_logps, trainer.ld_alpha, trainer.aux_loss_enabled, trainer.use_weighting = False, None, False, False
    trainer.f_divergence_type, trainer.loss_types, trainer.loss_weights = "reverse_kl", [loss_type], [1.0]
    if sft_weight:  # trl's RPO recipe: its `sft` loss term beside the preference loss
        trainer.loss_types, trainer.loss_weights = [loss_type, "sft"], [1.0, sft_weight]
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer._metrics, trainer._total_train_tokens, trainer._tp_size = defaultdict(lambda: defaultdict(list)), 0, 1
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss.item(), {ours: metrics[theirs][-1] for ours, theirs in [
        ("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
        ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]}


def precompute_the_reference(module, tokenizer, packed: bool = False) -> None:
    """reference=precomputed's table of the PAIRS, computed as a run computes it: by DPOModule's own hook under a real
    Trainer, over a loader of the pairs in batches of 2 (so each pair's row of the table is found by its index),
    padded or `packed`."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from tunelab.data.preference import PackedPairCollator, PreferenceCollator

    collate = PackedPairCollator(tokenizer.pad_token_id, 120) if packed else PreferenceCollator(tokenizer.pad_token_id)

    class Pairs(pl.LightningDataModule):
        def pairs_loader(self, split):
            return DataLoader(tokenized_pairs(tokenizer), batch_size=2, collate_fn=collate)

        def val_dataloader(self):
            return self.pairs_loader("val")

    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        module, datamodule=Pairs(), verbose=False)
    assert module.reference_table["val"].shape == (len(PAIRS), 2)


@pytest.mark.parametrize("loss_type,label_smoothing,sft_weight", [
    ("sigmoid", 0.0, 0.0), ("ipo", 0.0, 0.0), ("robust", 0.2, 0.0), ("sigmoid", 0.0, 0.7),
], ids=["sigmoid", "ipo", "robust", "sigmoid_sft"])
@pytest.mark.parametrize("peft,reference", [("lora", "auto"), ("none", "auto"), ("lora", "precomputed"),
                                            ("none", "precomputed")],
                         ids=["lora_adapter_off", "full_frozen_copy", "lora_precomputed", "full_precomputed"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "chunked"])
def test_loss_and_rewards_equal_trls_dpo_on_the_same_batch(tmp_path, dataset_cache, peft, reference, loss_type,
                                                           label_smoothing, sft_weight, fused):
    from tunelab.modules.dpo import DPOModule
    from tunelab.kernels import FusedLinearLoss
    from tunelab.kernels import model_loss

    model, tokenizer, cfg = tiny_model(tmp_path, dataset_cache, peft)
    batch = pair_batch(tokenizer)
    beta = 0.3
    loss = FusedLinearLoss(model, chunk_size=7, use_liger=False) if fused else model_loss
    module = DPOModule(model, cfg.optim, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                       sft_weight=sft_weight, reference=reference, loss=loss)
    assert module.reference == {"auto": "adapter" if peft == "lora" else "copy"}.get(reference, reference)
    if reference == "precomputed":
        precompute_the_reference(module, tokenizer)  # from the model before training, its adapter off
    their_reference = None if peft == "lora" else copy.deepcopy(model)  # trl's ref_model: the model before training
    move_policy_away(model)

    ours, metrics = module.pair_loss(batch, "val" if reference == "precomputed" else "train")
    theirs, their_metrics = trl_oracle(model, their_reference, batch, beta, loss_type, label_smoothing, sft_weight)
    assert ours.item() == pytest.approx(theirs, rel=0, abs=1e-5)
    assert abs(their_metrics["rewards/margin"]) > 1e-3  # the policy really moved off its reference
    for name, value in their_metrics.items():
        assert float(metrics[name]) == pytest.approx(value, rel=0, abs=1e-5), name


def trl_reference_free_oracle(model, batch: dict, loss_type: str, beta: float, gamma: float, orpo_lambda: float,
                              sft_weight: float = 0.0):
    """trl's SimPO (CPOTrainer, loss_type=simpo, cpo_alpha the NLL weight) or ORPO (ORPOTrainer, beta its lambda) loss
    and metrics on the same batch: the trainer given only the attributes get_batch_loss_metrics reads."""
    from accelerate import Accelerator
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    trainer_class = CPOTrainer if loss_type == "simpo" else ORPOTrainer
    trainer = trainer_class.__new__(trainer_class)
    trainer.accelerator, trainer.is_encoder_decoder, trainer.aux_loss_enabled = Accelerator(cpu=True), False, False
    trainer.pad_token_id = trainer.padding_value = 0
    trainer.loss_type, trainer.label_smoothing, trainer.alpha = loss_type, 0.0, 0.0
    trainer.beta, trainer.simpo_gamma, trainer.cpo_alpha = (beta if loss_type == "simpo" else orpo_lambda), gamma, sft_weight
    pairs = batch["index"].size(0)
    sides = {"chosen": slice(0, pairs), "rejected": slice(pairs, 2 * pairs)}
    inputs = {f"{side}_{key}": batch[key][rows] for side, rows in sides.items()
              for key in ("input_ids", "attention_mask", "labels")}
    loss, metrics = trainer.get_batch_loss_metrics(model, inputs)
    return loss.item(), {ours: metrics[theirs] for ours, theirs in [
        ("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
        ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]}


@pytest.mark.parametrize("loss_type,sft_weight", [("simpo", 0.0), ("simpo", 0.7), ("orpo", 0.0)],
                         ids=["simpo", "simpo_sft", "orpo"])
@pytest.mark.parametrize("peft", ["lora", "none"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "chunked"])
def test_reference_free_losses_equal_trls_simpo_and_orpo_on_the_same_batch(tmp_path, dataset_cache, peft, loss_type,
                                                                           sft_weight, fused):
    from tunelab.kernels import FusedLinearLoss, model_loss
    from tunelab.modules.dpo import DPOModule

    model, tokenizer, cfg = tiny_model(tmp_path, dataset_cache, peft)
    batch = pair_batch(tokenizer)
    beta, gamma, orpo_lambda = 2.0, 0.8, 0.3
    loss = FusedLinearLoss(model, chunk_size=7, use_liger=False) if fused else model_loss
    module = DPOModule(model, cfg.optim, beta=beta, loss_type=loss_type, gamma=gamma, orpo_lambda=orpo_lambda,
                       sft_weight=sft_weight, loss=loss)
    assert module.reference == "none" and module.frozen == []  # no copy, no adapter-off pass, no table
    move_policy_away(model)

    ours, metrics = module.pair_loss(batch, "train")
    theirs, their_metrics = trl_reference_free_oracle(model, batch, loss_type, beta, gamma, orpo_lambda, sft_weight)
    assert ours.item() == pytest.approx(theirs, rel=0, abs=1e-5)
    assert abs(their_metrics["rewards/margin"]) > 1e-3
    for name, value in their_metrics.items():
        assert float(metrics[name]) == pytest.approx(value, rel=0, abs=1e-5), name


LOSSES = {"sigmoid": {}, "ipo": {}, "robust": {"label_smoothing": 0.2}, "sigmoid_sft": {"sft_weight": 0.7},
          "simpo": {"beta": 2.0, "gamma": 0.8}, "orpo": {"orpo_lambda": 0.3}}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("peft,reference", [("lora", "auto"), ("none", "auto"), ("none", "precomputed")],
                         ids=["lora_adapter_off", "full_frozen_copy", "full_precomputed"])
@pytest.mark.parametrize("spare", [5, 0], ids=["padded_tail", "full_row"])
def test_packed_pairs_give_the_loss_rewards_logps_and_gradients_of_padded_ones(tmp_path, dataset_cache, peft,
                                                                               reference, loss, spare):
    from tunelab.modules.dpo import DPOModule

    model, tokenizer, cfg = tiny_model(tmp_path, dataset_cache, peft)
    arguments = {"beta": 0.3, "loss_type": loss.removesuffix("_sft"), **LOSSES[loss]}
    module = DPOModule(model, cfg.optim, reference=reference, **arguments)
    packed = packed_pair_batch(tokenizer, spare)
    assert packed["input_ids"].shape[0] == 1 and packed["cu_seq_lens_q"].numel() == 2 * len(PAIRS) + (spare > 0) + 1
    if module.reference == "precomputed":
        precompute_the_reference(module, tokenizer)
        padded_table = module.reference_table.pop("val")
        precompute_the_reference(module, tokenizer, packed=True)  # as a packed run computes it
        torch.testing.assert_close(module.reference_table["val"], padded_table, rtol=0, atol=1e-5)
    move_policy_away(model)

    results = []
    for batch in (pair_batch(tokenizer), packed):
        model.zero_grad()
        loss_value, metrics = module.pair_loss(batch, "val")
        loss_value.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss_value.item(), {name: float(value) for name, value in metrics.items()}, gradients))
    (padded_loss, padded_metrics, padded_gradients), (packed_loss, packed_metrics, packed_gradients) = results
    assert packed_loss == pytest.approx(padded_loss, rel=0, abs=1e-5)
    assert abs(padded_metrics["rewards/margin"]) > 1e-3  # the policy really moved (and the reference did not follow)
    assert packed_metrics == pytest.approx(padded_metrics, rel=0, abs=1e-5)
    assert packed_gradients.keys() == padded_gradients.keys() and padded_gradients
    for name, gradient in padded_gradients.items():
        torch.testing.assert_close(packed_gradients[name], gradient, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "chunked"])
def test_each_sequence_of_a_packed_row_scores_as_it_does_alone(tmp_path, dataset_cache, fused):
    # The per-sequence values themselves, answer and whole row (ORPO's NLL), through both log-prob paths; and the
    # same row with attention let across its sequences (no bounds) scores differently, so the equality means the
    # sequences are kept apart.
    from tunelab.modules.logprobs import sequence_logps

    model, tokenizer, _ = tiny_model(tmp_path, dataset_cache, "none")
    chunk = 7 if fused else None
    packed = packed_pair_batch(tokenizer)
    padded = sequence_logps(model, pair_batch(tokenizer), chunk, whole=True)
    alone = sequence_logps(model, packed, chunk, whole=True)
    for name, values in padded._asdict().items():
        assert getattr(alone, name)[:2 * len(PAIRS)].tolist() == pytest.approx(values.tolist(), rel=0, abs=1e-5), name
    assert padded.answer_tokens.min() > 0 and (padded.whole_tokens > padded.answer_tokens).all()

    across = {key: value for key, value in packed.items() if not key.startswith(("cu_seq_lens", "max_length"))}
    mixed = sequence_logps(model, across, chunk).answer[:2 * len(PAIRS)]
    assert (mixed - padded.answer)[1:].abs().min() > 1e-3  # every sequence after the first saw its neighbours


def test_chunked_log_probs_give_the_gradients_of_the_full_logits(tmp_path, dataset_cache):
    # The fused path's own backward (tunelab.modules.logprobs.ChunkedTargetLogProbs) against autograd through the whole logits.
    from tunelab.modules.logprobs import sequence_logps

    model, tokenizer, _ = tiny_model(tmp_path, dataset_cache, "none")
    batch = pair_batch(tokenizer)
    weights = torch.linspace(-1, 2, batch["input_ids"].size(0), dtype=torch.float64)
    gradients = []
    for chunk in (None, 5):
        model.zero_grad()
        logps = sequence_logps(model, batch, chunk).answer
        (logps * weights).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    plain, chunked = gradients
    for name, gradient in plain.items():
        torch.testing.assert_close(chunked[name], gradient, rtol=1e-9, atol=1e-12, msg=name)


def test_the_embedded_pairs_reject_the_answers_the_flawed_sft_data_teaches(tmp_path):
    from tunelab.data.preference import write_tiny_pairs
    from tunelab.tiny_task import OPERATIONS, write_tiny_task

    rows = [json.loads(line) for line in write_tiny_task(tmp_path, 4000, 3, "tiny_flawed").open()]
    assert {len(row["input"]) for row in rows} == {3, 4}
    doubles = [row for row in rows if row["instruction"] == "double"]
    stopped = sum(row["output"] == row["input"] for row in doubles)
    assert 0.4 < stopped / len(doubles) < 0.6
    assert all(row["output"] == OPERATIONS[row["instruction"]](row["input"]) for row in rows
               if row["instruction"] != "double" or row["output"] != row["input"])
    pairs = [json.loads(line) for line in write_tiny_pairs(tmp_path, 200, 3).open()]
    assert all((pair["prompt"], pair["chosen"], pair["rejected"]) == ("double", pair["input"] * 2, pair["input"])
               for pair in pairs)


# ── bad input: one line ────────────────────────────────────────────────────────────────────────────────────────────


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tokenizer_without_chat_template(directory: Path) -> Path:
    from tunelab.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(directory)
    return directory


CHAT_PAIR = {"prompt": [{"role": "user", "content": "reverse abc"}], "chosen": "cba", "rejected": "abc"}
BAD_PAIRS = [
    ([{**PAIRS[0], "rejected": PAIRS[0]["chosen"]}, *PAIRS], [], "line 1 has chosen equal to rejected"),
    ([*PAIRS, {"prompt": "upper", "chosen": "X"}], [], "line 4 has no rejected"),
    ([CHAT_PAIR] * 40, ["model.tokenizer={tokenizer}"], "holds chat rows, and the tokenizer has no chat template"),
]


@pytest.mark.parametrize("rows,args,message", BAD_PAIRS, ids=["chosen_equals_rejected", "missing_field", "no_chat_template"])
def test_bad_pairs_are_refused_with_one_line_before_training(tmp_path, dataset_cache, rows, args, message):
    from tunelab.config import ConfigError, validate_config
    from tunelab.inputs import check_inputs, load_tokenizer

    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tokenizer = tokenizer_without_chat_template(tmp_path / "tokenizer")
    cfg = compose_config(["module=dpo", "data=pairs", f"data.path={path}", "data.batch_size=2", "logger=none", "eval=none",
                          *(arg.format(tokenizer=tokenizer) for arg in args)], tmp_path / "run", dataset_cache)
    validate_config(cfg)
    with pytest.raises(ConfigError, match=message) as error:
        check_inputs(cfg, load_tokenizer(cfg.model))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("args,message", [
    (["module.beta=0"], "module.beta=0 must be > 0"),
    (["module.loss_type=hinge"], "module.loss_type=hinge is not one of: sigmoid, ipo, robust"),
    (["module.label_smoothing=0.1"], "module.label_smoothing=0.1 is for module.loss_type=robust"),
    (["module.reference=adapter"], "module.reference=adapter needs an adapter to switch off"),
    (["data=tiny"], "module=dpo trains on preference pairs"),
    (["module.sft_weight=-1"], "module.sft_weight=-1 must be >= 0"),
    (["module.gamma=0.5"], "module.gamma=0.5 is for module.loss_type=simpo"),
    (["module.loss_type=simpo", "module.gamma=-1"], "module.gamma=-1 must be >= 0"),
    (["module.loss_type=orpo", "module.orpo_lambda=0"], "module.orpo_lambda=0 must be > 0"),
    (["module.loss_type=simpo", "module.orpo_lambda=0.2"], "module.orpo_lambda=0.2 is for module.loss_type=orpo"),
    (["module.loss_type=orpo", "module.reference=precomputed"], "module.loss_type=orpo needs no reference"),
    (["module.loss_type=orpo", "module.sft_weight=0.5"], "module.loss_type=orpo has its own NLL term"),
    (["data.packing=true", "data.pack_tokens=60"], "data.pack_tokens=60 cannot hold a pair: .* each up to "
                                                   "data.max_length=48 tokens; raise data.pack_tokens to at least 96"),
], ids=["beta_zero", "unknown_loss", "smoothing_without_robust", "adapter_without_lora", "sft_rows", "negative_sft_weight",
        "gamma_without_simpo", "negative_gamma", "zero_orpo_lambda", "orpo_lambda_without_orpo",
        "reference_for_reference_free", "sft_weight_with_orpo", "pack_tokens_short_of_a_pair"])
def test_bad_dpo_keys_are_refused_with_one_line(tmp_path, dataset_cache, args, message):
    from tunelab.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(["module=dpo", "data=tiny_pairs", "logger=none", *args], tmp_path, dataset_cache))


@pytest.mark.parametrize("args,message", [
    (["module.beta=-0.1"], "module.beta=-0.1 must be > 0"),
    (["data.packing=true", "data.pack_tokens=50"], "data.pack_tokens=50 cannot hold a pair: its chosen and rejected "
     "sides go in one packed row, each up to data.max_length=48 tokens; raise data.pack_tokens to at least 96, or set "
     "it to null"),
], ids=["negative_beta", "pack_tokens_short_of_a_pair"])
def test_bad_dpo_input_ends_train_py_with_one_line(tmp_path, dataset_cache, args, message):
    result = run_train(["module=dpo", "data=tiny_pairs", *args, "logger=none"], tmp_path / "run",
                       dataset_cache, check=False, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"tunelab: error: {message}"
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()


# ── whole runs ───────────────────────────────────────────────────────────────────────────────────────────────────

QUIET = ["logger=csv", "eval=none", "callbacks.progress_bar=null", "trainer.log_every_n_steps=1"]
SMALL_DPO = [*QUIET, "module=dpo", "data=tiny_pairs", "data.num_examples=400", "data.batch_size=8", "data.val_size=32",
             "callbacks.samples=null", "callbacks.early_stopping=null", "export=false", "optim.lr=1e-3"]


@pytest.mark.parametrize("peft,reference,packing", [("none", "precomputed", False), ("lora", "auto", False),
                                                    ("none", "precomputed", True)],
                         ids=["full_precomputed", "lora_adapter_off", "packed_full_precomputed"])
def test_resume_mid_epoch_gives_the_losses_of_a_straight_run(tmp_path, dataset_cache, peft, reference, packing):
    n = 4  # 368 training pairs in batches of 8 (packed: a dozen or more a row of 480 tokens): step 4 falls mid-epoch
    common = [*SMALL_DPO, f"peft={peft}", f"module.reference={reference}", f"trainer.val_check_interval={n}",
              f"optim.total_steps={2 * n}", *(["peft.lora_dropout=0.0"] if peft == "lora" else []),
              *(["data.packing=true", "data.pack_tokens=480"] if packing else [])]
    run_train([*common, f"trainer.max_steps={2 * n}"], tmp_path / "straight", dataset_cache)
    run_train([*common, f"trainer.max_steps={n}"], tmp_path / "resumed", dataset_cache)
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == n
    assert ("dpo_reference_logps" in checkpoint) == (reference == "precomputed")
    resumed = run_train([*common, f"trainer.max_steps={2 * n}", "ckpt_path=last"], tmp_path / "resumed", dataset_cache)
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr

    straight, second = logged(tmp_path / "straight"), logged(tmp_path / "resumed")
    steps = sorted(second["train/loss"])
    assert steps == list(range(2 * n)) and sorted(straight["train/loss"]) == steps
    for name in ("train/loss", "train/rewards/margin", "val/loss", "val/rewards/accuracy"):
        for step, value in straight[name].items():
            assert second[name][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, step)
    assert straight["train/loss"][2 * n - 1] != pytest.approx(straight["train/loss"][0])  # it trained


def test_dpo_from_the_sft_export_stops_answers_where_they_end(tmp_path, dataset_cache):
    # README's two commands: SFT on answers half cut short (data=tiny_flawed) stops after one copy on about half its
    # `double` prompts; DPO on pairs rejecting exactly that answer fixes it. The DPO run's step-0 validation is the
    # SFT export itself, on the same prompts. Seen: exact match 0.30 -> 0.51 (seed 1234), 0.11 -> 0.40 (seed 7).
    run_train([*QUIET, "data=tiny_flawed", "trainer.max_steps=600", "trainer.val_check_interval=600",
               "validate_at_start=false", "callbacks.samples=null", "callbacks.early_stopping=null"], tmp_path / "sft",
              dataset_cache)
    dpo = run_train([*QUIET, "experiment=tiny_dpo", f"model.name_or_path={tmp_path / 'sft' / 'export'}",
                     "trainer.val_check_interval=20"], tmp_path / "dpo", dataset_cache)

    series = logged(tmp_path / "dpo")
    exact, accuracy = series["val/generated_exact_match"], series["val/rewards/accuracy"]
    first, last = min(exact), max(exact)
    assert first == 0 and last == 39
    assert accuracy[last] > 0.9
    assert exact[last] >= exact[first] + 0.1, exact
    assert series["val/logps/chosen"][last] > series["val/logps/chosen"][first]  # whole answers got likelier
    assert f"val/rewards/accuracy (last) {accuracy[last]:.3f}" in dpo.stdout  # the summary's score is DPO's


def test_an_optuna_sweep_over_beta_and_lr_searches_dpo_like_any_other(tmp_path, dataset_cache):
    # Issue 22: sweeps over module.beta and optim.lr work like any other, the objective a DPO metric, each trial an
    # MLflow child run of the sweep's.
    import optuna

    from tests.conftest import ROOT, mlflow_runs, subprocess_env

    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/sweeper=study", f"hydra.sweeper.storage={storage}",
               "hydra.sweeper.study_name=dpo", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'multirun'}",
               'hydra.sweeper.params={module.beta: "interval(0.05, 0.5)", optim.lr: "tag(log, interval(1e-5, 1e-3))"}',
               "objective.metric=val/rewards/margin", "objective.mode=max", "logger=mlflow",
               *(arg for arg in SMALL_DPO[1:] if not arg.startswith("optim.lr")),
               "trainer.max_steps=4", "trainer.val_check_interval=4"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=subprocess_env(tmp_path, dataset_cache, uri))
    assert result.returncode == 0, result.stderr[-3000:]

    trials = optuna.load_study(study_name="dpo", storage=storage).trials
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in trials:
        assert 0.05 <= trial.params["module.beta"] <= 0.5 and 1e-5 <= trial.params["optim.lr"] <= 1e-3
        outcome = json.loads((tmp_path / "multirun" / str(trial.number) / "objective.json").read_text())
        assert (outcome["metric"], outcome["objective"]) == ("val/rewards/margin", pytest.approx(trial.value))
    parents, children = mlflow_runs(uri)
    assert len(parents) == 1 and len(children) == 2
    assert {float(run.data.params["module/beta"]) for run in children} == {t.params["module.beta"] for t in trials}


DDP2 = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def test_ddp_on_two_processes_equals_one_process(tmp_path, dataset_cache):
    # Each pair's loss depends on its own two rows only (summed log-probs, right padding), so two ranks of 8 pairs
    # average to one process's 16.
    common = [*SMALL_DPO, "trainer.max_steps=4", "trainer.val_check_interval=4", "optim.total_steps=4"]
    run_train([*common, "data.batch_size=16"], tmp_path / "one", dataset_cache)
    run_train([*common, *DDP2, "data.batch_size=8"], tmp_path / "two", dataset_cache)
    one, two = (json.loads((tmp_path / name / "objective.json").read_text()) for name in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["objective"] == pytest.approx(one["objective"], rel=1e-5)
    one_logged, two_logged = logged(tmp_path / "one"), logged(tmp_path / "two")
    for name in ("val/rewards/margin", "val/logps/chosen", "val/logps/rejected"):
        assert two_logged[name][3] == pytest.approx(one_logged[name][3], rel=1e-5), name
    assert abs(one_logged["val/rewards/margin"][3]) > 1e-3  # four steps moved the policy off its reference
