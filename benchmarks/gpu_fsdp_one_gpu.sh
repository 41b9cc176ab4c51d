#!/usr/bin/env bash
# Issue 4's GPU check on one GPU: FSDP (1 device), llama1b architecture, random init, bf16-true, batch 4 x 2048,
# full fine-tune and LoRA, each written as a sharded checkpoint and resumed. Figures go to $OUT (or ./bench_out).
source "$(dirname "$0")/gpu_runs.sh"   # OUT, RUNS, PY, env.txt, run
COMMON="model=llama1b model.init=random model.tokenizer=char data=random_tokens precision=bf16_true strategy=fsdp
  trainer.devices=1 trainer.log_every_n_steps=1 logger=csv callbacks.progress_bar=null callbacks.early_stopping=null
  callbacks.model_checkpoint.save_top_k=0 export=false"
# ONLY="lora lora_resumed" runs a subset.
run full trainer.max_steps=40 trainer.val_check_interval=40
run full_resumed trainer.max_steps=50 trainer.val_check_interval=50 ckpt_path=$RUNS/full/checkpoints/last.ckpt
run lora peft=lora trainer.max_steps=40 trainer.val_check_interval=40
run lora_resumed peft=lora trainer.max_steps=50 trainer.val_check_interval=50 ckpt_path=$RUNS/lora/checkpoints/last.ckpt
run full_activation_checkpointing strategy.activation_checkpointing=true trainer.max_steps=30 trainer.val_check_interval=30
ls -la $RUNS/*/checkpoints/ | tee -a "$OUT/log.txt"
