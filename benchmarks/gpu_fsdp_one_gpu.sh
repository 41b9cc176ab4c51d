#!/usr/bin/env bash
# FSDP2 on one GPU against FSDP1 and strategy=auto, in the same call (issue 31's GPU check): llama1b architecture,
# random init, bf16-true, batch 4 x 2048, full fine-tune and LoRA; the FSDP2 runs write a sharded (DCP) checkpoint
# and resume from it. Goal: FSDP2 LoRA >= 0.9x the auto path. Figures go to $OUT (or ./bench_out).
#   auto_full / fsdp2_full / fsdp1_full, auto_lora / fsdp2_lora / fsdp1_lora, fsdp2_*_resumed, fsdp2_full_checkpointed
source "$(dirname "$0")/gpu_runs.sh"   # OUT, RUNS, PY, env.txt, want, run
COMMON="model=llama1b model.init=random model.tokenizer=char data=random_tokens precision=bf16_true
  trainer.devices=1 trainer.log_every_n_steps=5 logger=csv callbacks.progress_bar=null callbacks.early_stopping=null
  callbacks.model_checkpoint.save_top_k=0 export=false trainer.max_steps=40 trainer.val_check_interval=40"
# ONLY="fsdp2_lora auto_lora" runs a subset.
for kind in full lora; do
  [ $kind = lora ] && ADAPTER=peft=lora || ADAPTER=
  run auto_$kind $ADAPTER
  run fsdp2_$kind $ADAPTER strategy=fsdp
  run fsdp1_$kind $ADAPTER strategy=fsdp1
  run fsdp2_${kind}_resumed $ADAPTER strategy=fsdp trainer.max_steps=50 trainer.val_check_interval=50 \
    ckpt_path=$RUNS/fsdp2_$kind/checkpoints/last.ckpt
done
run fsdp2_full_checkpointed strategy=fsdp strategy.activation_checkpointing=true
ls -la $RUNS/*/checkpoints/ | tee -a "$OUT/log.txt"
