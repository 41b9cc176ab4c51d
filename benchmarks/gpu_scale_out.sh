#!/usr/bin/env bash
# Issue 4/5's GPU figures on every GPU of the machine (N = nvidia-smi's count) against one GPU, in the same call:
#   fsdp_1 / fsdp_N        full fine-tune under strategy=fsdp (FSDP2), sharded checkpoint; fsdp_N_resumed goes on from it
#   fsdp_N_full            state_dict_type=full checkpoint and an export gathered from all shards; then resumed
#   lora_1 / ddp_lora_N    LoRA, strategy=auto on one GPU, strategy=ddp on N
#   qlora / qlora_resumed  peft=qlora on one GPU over a locally saved random llama1b (4-bit NF4 as it loads)
# llama1b architecture, random init, bf16, 4 x 2048 random tokens per GPU. ONLY="fsdp_1 fsdp_N" runs a subset.
# Figures (one JSON line a run) go to $OUT/figures.jsonl, logs to $OUT/log.txt.
source "$(dirname "$0")/gpu_runs.sh"   # OUT, RUNS, PY, env.txt, want, run
N=${GPUS:-$(nvidia-smi -L | wc -l)}
COMMON="model=llama1b model.init=random model.tokenizer=char data=random_tokens precision=bf16_true
  trainer.log_every_n_steps=5 logger=csv callbacks.progress_bar=null callbacks.early_stopping=null
  callbacks.model_checkpoint.save_top_k=0 export=false"
FSDP="strategy=fsdp trainer.max_steps=30 trainer.val_check_interval=30"
run fsdp_1 $FSDP trainer.devices=1
run fsdp_N $FSDP trainer.devices=$N
run fsdp_N_resumed strategy=fsdp trainer.devices=$N trainer.max_steps=40 trainer.val_check_interval=40 ckpt_path=$RUNS/fsdp_N/checkpoints/last.ckpt
run fsdp_N_full $FSDP trainer.devices=$N strategy.state_dict_type=full export=true
run fsdp_N_full_resumed strategy=fsdp trainer.devices=$N strategy.state_dict_type=full trainer.max_steps=40 \
  trainer.val_check_interval=40 ckpt_path=$RUNS/fsdp_N_full/checkpoints/last.ckpt
want fsdp_N_full && ls -la $RUNS/fsdp_N_full/export | tee -a "$OUT/log.txt"
LORA="peft=lora trainer.max_steps=30 trainer.val_check_interval=30"
run lora_1 $LORA trainer.devices=1
run ddp_lora_N $LORA strategy=ddp trainer.devices=$N
if want qlora; then
  [ -d /tmp/llama1b_random ] || $PY benchmarks/save_random_model.py llama1b /tmp/llama1b_random >> "$OUT/log.txt" 2>&1
  QLORA="peft=qlora model.init=pretrained model.name_or_path=/tmp/llama1b_random trainer.devices=1"
  run qlora $QLORA trainer.max_steps=30 trainer.val_check_interval=30
  run qlora_resumed $QLORA trainer.max_steps=40 trainer.val_check_interval=40 ckpt_path=$RUNS/qlora/checkpoints/last.ckpt
fi
