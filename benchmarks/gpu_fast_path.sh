#!/usr/bin/env bash
# Issue 11's benchmark on one GPU, every figure from the same call on the same card:
#   ref_*           the hand-written loops (benchmarks/reference_loops.py, one process each): compile, liger, lora_compile,
#                   compile at batch 8
#   full_fast_b8    the default GPU path at batch 8 x 2048, which its lower memory allows
#   full_fast       tunelab's default GPU path (kernels=auto: fused loss, compiled layers, ...), full fine-tune
#   full_plain      tunelab's plain path (kernels=none)
#   lora_fast / lora_plain   the same with peft=lora
#   real_packed / real_padded / real_padded_plain   instruction rows of realistic lengths (benchmarks/real_length_data.py:
#                   log-normal, median 250 tokens, capped at 2048): packed, one example a row, one a row on the plain path
#   full_fp8 / lora_fp8 / full_fp8_rowwise   precision=fp8 (torchao float8 matmuls; tensorwise, or rowwise scales)
#   parity_bf16 / parity_fp8   300 steps on the real-length rows, packed, from one seed: val/loss every 50 steps
#   llama8b_lora / llama8b_lora_fp8   Llama-3.1-8B LoRA at NeMo AutoModel's published shape (rank 16, alpha 32, every
#                   projection, 2 x 4096), no activation checkpointing (with it where that runs out of memory)
#   llama8b_qlora   the same over an NF4 base (a random llama8b saved to disk first: QLoRA quantizes as it loads)
# llama1b architecture, random init, bf16, 4 x 2048 tokens a batch (real-length: batch 4 rows or 8192 packed tokens).
# ONLY="full_fast ref_compile" runs a subset; EXTRA="kernels.compile=none" adds overrides to every tunelab run.
# Then: python benchmarks/fast_path_table.py $OUT   (tokens/s, MFU, peak memory and the ratios)
source "$(dirname "$0")/gpu_runs.sh"   # OUT, RUNS, PY, env.txt, want, run
COMMON="model=llama1b model.init=random model.tokenizer=char precision=bf16_true trainer.devices=1 logger=csv
  callbacks.progress_bar=null callbacks.early_stopping=null callbacks.model_checkpoint=null export=false
  trainer.log_every_n_steps=5 ${EXTRA:-}"
ref() {  # ref NAME VARIANT [reference_loops.py options]
  local name=$1 variant=$2; shift 2
  want "$name" || return 0
  echo "=== $name" | tee -a "$OUT/log.txt"
  timeout 400 $PY benchmarks/reference_loops.py "$variant" --steps 20 "$@" --out "$OUT/reference.jsonl" >> "$OUT/log.txt" 2>&1
  echo "exit $? for $name" | tee -a "$OUT/log.txt"
}
ref ref_compile compile
ref ref_liger liger
ref ref_lora_compile lora_compile
ref ref_compile_b8 compile --batch 8
FIXED="data=random_tokens trainer.max_steps=40 trainer.val_check_interval=40"
run full_fast $FIXED
run full_plain $FIXED kernels=none
run full_fast_b8 $FIXED data.batch_size=8
run lora_fast $FIXED peft=lora
run lora_plain $FIXED peft=lora kernels=none
REAL_DATA=/tmp/real_length.jsonl
[ -f $REAL_DATA ] || $PY benchmarks/real_length_data.py $REAL_DATA --rows 8000 --seed 0 | tee -a "$OUT/log.txt"
REAL="data=jsonl data.path=$REAL_DATA data.max_length=2048 data.batch_size=4 data.max_val_examples=16 optim.lr=2e-5
  trainer.max_steps=60 trainer.val_check_interval=60"
run real_packed $REAL data.packing=true
run real_padded $REAL
run real_padded_plain $REAL kernels=none
run full_fp8 $FIXED precision=fp8
run lora_fp8 $FIXED peft=lora precision=fp8
run full_fp8_rowwise $FIXED precision=fp8 precision.float8.recipe=rowwise
PARITY="$REAL data.packing=true optim.lr=1e-4 trainer.max_steps=300 trainer.val_check_interval=50 data.max_val_examples=64"
run parity_bf16 $PARITY
run parity_fp8 $PARITY precision=fp8
COMMON=${COMMON/model=llama1b/model=llama8b}
LLAMA8B="data=random_tokens data.max_length=4096 data.batch_size=2 trainer.max_steps=30 trainer.val_check_interval=30
  data.val_size=2 peft=lora peft.lora_dropout=0 peft.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
run_fitting() {  # run_fitting NAME overrides...: without activation checkpointing, with it if that runs out of memory
  local name=$1; shift
  want "$name" || return 0
  local before; before=$(wc -c < "$OUT/log.txt")
  run "$name" $LLAMA8B model.gradient_checkpointing=false "$@"
  if tail -c +$((before + 1)) "$OUT/log.txt" | grep -q "out of GPU memory\|OutOfMemoryError"; then
    ONLY=${ONLY:+$ONLY ${name}_checkpointed} run "${name}_checkpointed" $LLAMA8B model.gradient_checkpointing=true "$@"
  fi
}
run_fitting llama8b_lora
run_fitting llama8b_lora_fp8 precision=fp8
if want llama8b_qlora; then
  [ -d /tmp/llama8b_random ] || $PY benchmarks/save_random_model.py llama8b /tmp/llama8b_random >> "$OUT/log.txt" 2>&1
  run_fitting llama8b_qlora peft=qlora model.init=pretrained model.name_or_path=/tmp/llama8b_random
fi
$PY benchmarks/fast_path_table.py "$OUT" "$RUNS" | tee -a "$OUT/table.md"
