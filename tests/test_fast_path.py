"""The fast path on CPU: the fused loss equals the plain one (value and gradients), packed rows keep their examples
apart, and a training step forces no GPU-to-host sync between logging steps."""

import importlib.util
import json
import math

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import FAST, compose_config, run_train
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.config import ConfigError, validate_config
from tunelab.data import (IGNORE_INDEX, InstructionCollator, PackedBatchSampler, PackedCollator, build_datamodule,
                          tokenize_example)
from tunelab.kernel_choice import resolve_kernels
from tunelab.kernels import FusedLinearLoss, apply_kernels
from tunelab.model import build_model
from tunelab.kernels import model_loss
from tunelab.modules.causal_lm import CausalLMModule, exact_match
from tunelab.peft import apply_peft

EXAMPLES = [("reverse abc=", "cba"), ("upper hello world=", "HELLO WORLD"), ("double xy=", "xyxy"), ("reverse q=", "q"),
            ("upper packing keeps examples apart=", "PACKING KEEPS EXAMPLES APART")]


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


def tiny_model(tmp_path, tokenizer, *overrides, packed=False):
    cfg = compose_config(list(overrides), tmp_path, tmp_path)
    torch.manual_seed(0)
    return apply_peft(build_model(cfg.model, cfg.precision, tokenizer, packed=packed), cfg.peft)


def padded_batch(tokenizer, examples=EXAMPLES):
    return InstructionCollator(tokenizer.pad_token_id)([tokenize_example(p, a, tokenizer, 64, True) for p, a in examples])


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_fused_loss_equals_plain_loss_and_gradients(tmp_path, tokenizer, peft):
    # The tiny model ties lm_head to the embedding: the fused loss's weight gradient must reach both uses.
    model = tiny_model(tmp_path, tokenizer, f"peft={peft}", "peft.lora_dropout=0.0" if peft == "lora" else "seed=1")
    batch = padded_batch(tokenizer)
    plain_loss, plain_grads = loss_and_grads(model, model_loss, batch)
    fused_loss, fused_grads = loss_and_grads(model, FusedLinearLoss(model, chunk_size=7, use_liger=False), batch)
    assert fused_loss == pytest.approx(plain_loss.item(), rel=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) > 1
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_fused_validation_equals_plain_loss_and_exact_match(tmp_path, tokenizer):
    model = tiny_model(tmp_path, tokenizer)
    batch = padded_batch(tokenizer)
    batch["labels"][2] = IGNORE_INDEX  # a row with no answer counts as matched, as the plain metric has it
    with torch.no_grad():
        outputs = model(**batch)
        loss, matches = FusedLinearLoss(model, chunk_size=5, use_liger=False).evaluate(model, batch)
    assert loss.item() == pytest.approx(outputs.loss.item(), rel=1e-6)
    assert torch.equal(matches, exact_match(outputs.logits, batch["labels"]))
    assert matches[2] == 1


def test_fused_loss_refuses_an_adapter_on_the_output_projection(tmp_path, dataset_cache, tokenizer):
    cfg = compose_config(["peft=lora", "kernels.loss=chunked", "peft.target_modules=[q_proj,lm_head]"], tmp_path, dataset_cache)
    with pytest.raises(ConfigError, match="lm_head"):
        validate_config(cfg)
    model = apply_peft(build_model(cfg.model, cfg.precision, tokenizer), cfg.peft)
    with pytest.raises(ValueError, match="kernels.loss=plain"):
        FusedLinearLoss(model, chunk_size=8, use_liger=False)


def test_kernels_default_to_the_plain_path_on_cpu_and_pick_compile_or_liger_ops(tmp_path):
    # The accelerator `auto` resolves to, named, so that each case holds on any machine (resolution only: nothing is
    # built); liger's kernels are taken exactly where liger-kernel is installed (the `gpu` extra).
    cpu, gpu = ["trainer.accelerator=cpu"], ["trainer.accelerator=gpu"]
    liger = importlib.util.find_spec("liger_kernel") is not None
    on_cpu = {"loss": "plain", "compile": "none", "fused_ops": "none"}
    assert resolve_kernels(compose_config(cpu, tmp_path, tmp_path)) == on_cpu
    on_gpu = {"loss": "liger" if liger else "chunked", "compile": "layers", "fused_ops": "native"}
    assert resolve_kernels(compose_config(gpu, tmp_path, tmp_path)) == on_gpu
    eager = resolve_kernels(compose_config([*gpu, "kernels.compile=none"], tmp_path, tmp_path))
    assert eager["fused_ops"] == ("liger" if liger else "none")
    fsdp_lora = compose_config([*gpu, "strategy=fsdp1", "peft=lora"], tmp_path, tmp_path)
    assert resolve_kernels(fsdp_lora)["compile"] == "none"  # FSDP1 flat parameters: eager layers
    fsdp2_lora = compose_config([*gpu, "strategy=fsdp", "peft=lora"], tmp_path, tmp_path)
    assert resolve_kernels(fsdp2_lora)["compile"] == "layers"  # FSDP2 compiles each layer it shards
    assert resolve_kernels(compose_config([], tmp_path, tmp_path)) == (on_gpu if torch.cuda.is_available() else on_cpu)


def test_kernels_leave_state_dict_keys_unchanged(tmp_path, tokenizer):
    model = tiny_model(tmp_path, tokenizer)
    keys = list(model.state_dict())
    cfg = compose_config(["kernels.compile=layers", "kernels.loss=chunked", "kernels.fused_ops=native"], tmp_path, tmp_path)
    compiled = apply_kernels(model, resolve_kernels(cfg))
    assert list(compiled.state_dict()) == keys
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)


def test_packed_row_keeps_each_example_to_itself(tmp_path, tokenizer):
    packed_model = tiny_model(tmp_path, tokenizer, packed=True)
    alone_model = tiny_model(tmp_path, tokenizer)
    rows = [tokenize_example(p, a, tokenizer, 64, True) for p, a in EXAMPLES]
    batch = PackedCollator(tokenizer.pad_token_id, budget=160)(rows)
    with torch.no_grad():
        packed = packed_model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for row in rows:
            n = len(row["input_ids"])
            alone = alone_model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
    assert start < 160  # the rest of the row is padding, a segment of its own


def test_packed_labels_mask_prompts_padding_and_example_boundaries(tokenizer):
    rows = [tokenize_example(p, a, tokenizer, 64, True) for p, a in EXAMPLES]
    batch = PackedCollator(tokenizer.pad_token_id, budget=160)(rows)
    labels, positions, bounds = batch["labels"][0], batch["position_ids"][0], batch["cu_seq_lens_q"].tolist()
    assert bounds[0] == 0 and bounds[-1] == 160 and len(bounds) == len(rows) + 2
    for row, start in zip(rows, bounds):
        n = len(row["input_ids"])
        assert labels[start] == IGNORE_INDEX  # nothing before it in the row may learn an example's first token
        assert labels[start + 1:start + n].tolist() == row["labels"][1:]
        assert positions[start:start + n].tolist() == list(range(n))
    used = bounds[-2]
    assert (labels[used:] == IGNORE_INDEX).all() and batch["attention_mask"][0].sum() == used


def test_packed_batches_cover_the_epoch_once_fit_the_budget_and_resume():
    lengths = [5 + (i * 7) % 40 for i in range(300)]
    batches = list(PackedBatchSampler(lengths, budget=128, seed=3))
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    assert all(sum(lengths[i] for i in batch) <= 128 for batch in batches)
    assert sum(lengths) / (128 * len(batches)) > 0.9  # padding-free: few tokens of each batch are padding
    resumed = PackedBatchSampler(lengths, budget=128, seed=3)
    resumed.skip = 10
    assert list(resumed) == batches[10:]
    ranks = [list(PackedBatchSampler(lengths, budget=128, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def whole_logits_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def loss_curves(tmp_path, tokenizer, runs: dict, steps: int = 50) -> dict[str, list[float]]:
    """Train one tiny model per run on the same 16 examples a step (default task, seeded order) for `steps` optimizer
    steps; runs maps a name to (model, collate, loss). Returns each run's losses."""
    cfg = compose_config(["data.num_examples=400"], tmp_path, tmp_path)
    datamodule = build_datamodule(cfg.data, tokenizer)
    datamodule.setup("fit")
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=3e-3) for name, (model, _, _) in runs.items()}
    curves = {name: [] for name in runs}
    for step in range(steps):
        rows = [datamodule.train[i] for i in range(step * 16 % 320, step * 16 % 320 + 16)]
        for name, (model, collate, loss_fn) in runs.items():
            loss = loss_fn(model, collate(rows))
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            curves[name].append(loss.item())
    return curves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_loss_follows_the_plain_loss_curve(tmp_path, tokenizer, dtype):
    """50 optimizer steps on the same batches: the fused (chunked) loss gives the plain loss curve to 1e-4. Both
    compute the same function with sums in another order, ~1e-7 apart in float32; Adam at this learning rate amplifies
    that step after step (past 1e-4 after ~20 steps), so float32 is held to its first 10 steps and float64 to all 50."""
    collate = InstructionCollator(tokenizer.pad_token_id)
    plain, fused = tiny_model(tmp_path, tokenizer).to(dtype), tiny_model(tmp_path, tokenizer).to(dtype)
    steps = 10 if dtype == torch.float32 else 50
    # transformers' own loss casts the logits to float32 even in a float64 model: take the same cross-entropy whole.
    reference = model_loss if dtype == torch.float32 else whole_logits_loss
    curves = loss_curves(tmp_path, tokenizer, {"plain": (plain, collate, reference),
                                                "fused": (fused, collate, FusedLinearLoss(fused, 100, use_liger=False))},
                         steps)
    assert curves["fused"][-1] < 0.8 * curves["fused"][0]  # it learned
    assert curves["fused"] == pytest.approx(curves["plain"], abs=1e-4)


def test_packed_training_follows_the_padded_loss_curve(tmp_path, tokenizer):
    """The same examples per step, padded rows vs one packed row: 50 optimizer steps, the same losses to 1e-4. In
    float64: float32 rounding differs between the two attention layouts by ~1e-7, which Adam at this learning rate
    amplifies step after step; float64 shows what is left is the arithmetic of packing itself."""
    padded, packed = tiny_model(tmp_path, tokenizer).double(), tiny_model(tmp_path, tokenizer, packed=True).double()
    fused = FusedLinearLoss(padded, 64, use_liger=False)
    curves = loss_curves(tmp_path, tokenizer, {
        "padded": (padded, InstructionCollator(tokenizer.pad_token_id), fused),
        "packed": (packed, PackedCollator(tokenizer.pad_token_id, 48 * 16), fused)})
    assert curves["packed"][-1] < 0.8 * curves["packed"][0]  # it learned
    assert curves["packed"] == pytest.approx(curves["padded"], abs=1e-4)


class HostSyncCounter(pl.Callback):
    """Counts tensor-to-host reads (.item(), float(), int(), bool(), .tolist()) during each training batch."""

    READS = ("item", "__float__", "__int__", "__bool__", "tolist")

    def __init__(self, monkeypatch):
        self.monkeypatch, self.active, self.by_step = monkeypatch, False, {}
        for name in self.READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if self.active:
                    self.by_step[self.step] = self.by_step.get(self.step, 0) + 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step, self.active = trainer.global_step, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.active = False


def test_training_steps_between_logging_steps_never_sync(tmp_path, dataset_cache, tokenizer, monkeypatch):
    """Padded rows only: on CPU a packed row's attention reads its example boundaries on the host, which on a GPU go
    to the varlen kernel on the device (the GPU benchmark runs with torch.cuda.set_sync_debug_mode)."""
    from tunelab.callbacks import ObjectiveTracker, build_callbacks

    cfg = compose_config(["data.num_examples=200", "callbacks.model_checkpoint=null", "callbacks.early_stopping=null",
                          "optim.fused=true",  # as on a GPU: torch's single-tensor AdamW reads its step count
                          ], tmp_path, dataset_cache)
    model = build_model(cfg.model, cfg.precision, tokenizer)
    counter = HostSyncCounter(monkeypatch)
    callbacks = [*build_callbacks(cfg.callbacks), ObjectiveTracker("val/loss", "min"), counter]
    trainer = pl.Trainer(max_steps=12, log_every_n_steps=5, logger=pl.loggers.CSVLogger(tmp_path), callbacks=callbacks,
                         enable_checkpointing=True,  # the default callbacks' preemption checkpoint, no ModelCheckpoint
                         limit_val_batches=0, enable_model_summary=False,
                         use_distributed_sampler=False, gradient_clip_val=1.0)
    trainer.fit(CausalLMModule(model, cfg.optim, loss=FusedLinearLoss(model, 4096, use_liger=False)),
                datamodule=build_datamodule(cfg.data, tokenizer))
    # Reads at each logging step (every 5th), so the counter is seen counting, and at no other but the last.
    logging_steps = {4, 9}
    assert logging_steps <= set(counter.by_step) <= logging_steps | {11}, counter.by_step


def test_packed_job_learns_as_well_as_a_padded_one(tmp_path, dataset_cache, tokenizer):
    """train.py with packed rows against the control of padded ones, the same steps on about as many examples a step
    (the tiny task's examples average 20 tokens: 640 packed tokens hold ~31, a padded batch 32): the best val/loss
    within 5% of the control's (1% apart here). Packed attention that crossed examples ended 11% above it."""
    args = [*FAST, "trainer.max_steps=60", "trainer.val_check_interval=30", "data.num_examples=2000", "export=false",
            "callbacks.samples=null", "logger=none"]
    run_train([*args, "data.packing=true", "data.pack_tokens=640"], tmp_path / "packed", dataset_cache)
    run_train(args, tmp_path / "padded", dataset_cache)
    packed, padded = (json.loads((tmp_path / run / "objective.json").read_text())["objective"] for run in ("packed", "padded"))
    untrained = math.log(len(tokenizer))  # a model that knows nothing spreads its guess over the vocabulary
    assert padded < 0.7 * untrained  # the control learned
    assert packed == pytest.approx(padded, rel=0.05)


def test_fused_validation_under_a_bfloat16_default_dtype(tmp_path, tokenizer):
    """precision=bf16_true makes bfloat16 the default dtype inside the LightningModule; counts must not follow it."""
    model = tiny_model(tmp_path, tokenizer).to(torch.bfloat16)
    batch = padded_batch(tokenizer)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        loss, matches = FusedLinearLoss(model, chunk_size=5, use_liger=False).evaluate(model, batch)
    finally:
        torch.set_default_dtype(default)
    assert matches.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_lean_rms_norm_equals_the_model_norm_in_value_and_gradients(tmp_path, tokenizer):
    from tunelab.kernels import apply_fused_ops

    model = tiny_model(tmp_path, tokenizer)
    batch = padded_batch(tokenizer)
    plain_loss, plain_grads = loss_and_grads(model, model_loss, batch)
    assert apply_fused_ops(model, "native") == 2 * len(model.model.layers) + 1  # two per layer and the final one
    lean_loss, lean_grads = loss_and_grads(model, model_loss, batch)
    assert lean_loss == pytest.approx(plain_loss.item(), rel=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(lean_grads[name], grad, rtol=1e-4, atol=1e-6), name


class GradientsAtForward(pl.Callback):
    def __init__(self):
        self.alive = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.alive.append(sum(p.grad is not None for p in pl_module.parameters()))


def test_gradients_are_freed_before_the_next_forward(tmp_path, dataset_cache, tokenizer):
    """Lightning zeroes gradients after a step's forward pass; holding the last step's through it costs a model's worth
    of memory at the peak (2.5 GiB for a 1B model in bf16)."""
    cfg = compose_config(["data.num_examples=200"], tmp_path, dataset_cache)
    probe = GradientsAtForward()
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[probe],
                         limit_val_batches=0, enable_model_summary=False, use_distributed_sampler=False, gradient_clip_val=1.0)
    model = build_model(cfg.model, cfg.precision, tokenizer)
    trainer.fit(CausalLMModule(model, cfg.optim), datamodule=build_datamodule(cfg.data, tokenizer))
    assert probe.alive == [0, 0, 0, 0]
