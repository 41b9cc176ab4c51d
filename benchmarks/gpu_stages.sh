#!/usr/bin/env bash
# The new stages on one GPU (issues 20, 22; issue 23 item 5), every figure from the same call on the same card,
# llama1b architecture (random init, char tokenizer, bf16-true), the embedded task's rows and pairs:
#   sft / sft_eval       40 steps of SFT; the same with eval=tiny on one task (tunelab_tiny, 100 documents, the base
#                        evaluated beside it): what evaluation costs is the difference in wall time
#   fsdp_eval            the same evaluation under strategy=fsdp (one device): the sharded path, every rank in lockstep
#   sft_pairs            SFT on the rows the pairs are made of (data=tiny), 64 rows a step
#   dpo_copy / dpo_precomputed          DPO, full fine-tune: a frozen copy as reference / log-probs computed once
#   lora_sft / dpo_adapter / dpo_lora_precomputed   the same under LoRA (reference: the adapter switched off)
# DPO takes 32 pairs a step (64 rows a forward, as sft_pairs). At these rows' ~20 tokens a step is launch-bound, so
# the real_* runs repeat the comparison at realistic lengths (benchmarks/real_length_data.py rows, median ~250
# tokens, as pairs: chosen = the row's answer, rejected = the next row's), 4 pairs / 8 rows a step:
#   real_sft / real_dpo_copy / real_dpo_precomputed / real_lora_sft / real_dpo_adapter
#   real_*_packed: the same packed (issue 33), and SimPO / ORPO, reference-free
# ONLY="sft sft_eval" runs a subset.
# lm_eval comes from the eval extra's wheels where the image lacks it (BENCHMARKS.md says which).
source "$(dirname "$0")/gpu_runs.sh"   # OUT, RUNS, PY, env.txt, want, run
COMMON="model=llama1b model.init=random model.tokenizer=char precision=bf16_true trainer.devices=1 logger=csv
  callbacks.progress_bar=null callbacks.early_stopping=null callbacks.model_checkpoint=null callbacks.samples=null
  export=false validate_at_start=false trainer.log_every_n_steps=5 trainer.max_steps=40 trainer.val_check_interval=40"
EVAL="eval=tiny eval.tasks=[tunelab_tiny] eval.limit=100"
run sft data=tiny eval=none
run sft_eval data=tiny $EVAL
run fsdp_eval data=tiny strategy=fsdp $EVAL paths.cache_dir=/tmp/tunelab_cache_fsdp
PAIRS="data=tiny_pairs data.num_examples=2000 data.batch_size=32 module=dpo eval=none"
run sft_pairs data=tiny data.num_examples=2000 data.batch_size=64 eval=none
run dpo_copy $PAIRS
run dpo_precomputed $PAIRS module.reference=precomputed
run lora_sft peft=lora data=tiny data.num_examples=2000 data.batch_size=64 eval=none
run dpo_adapter peft=lora $PAIRS
run dpo_lora_precomputed peft=lora $PAIRS module.reference=precomputed
REAL_ROWS=/tmp/real_rows.jsonl REAL_PAIRS=/tmp/real_pairs.jsonl
if want real_sft || want real_dpo_copy || want real_sft_packed || want real_dpo_packed_precomputed; then
  [ -f $REAL_ROWS ] || $PY benchmarks/real_length_data.py $REAL_ROWS --rows 800 --seed 0 >> "$OUT/log.txt"
  [ -f $REAL_PAIRS ] || $PY - "$REAL_ROWS" "$REAL_PAIRS" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
with open(sys.argv[2], "w") as out:
    for row, other in zip(rows, rows[1:] + rows[:1]):
        out.write(json.dumps({"prompt": f"{row['instruction']}\n{row['input']}", "chosen": row["output"],
                              "rejected": other["output"]}) + "\n")
PY
fi
REAL="trainer.max_steps=30 trainer.val_check_interval=30 data.max_length=2048 data.max_val_examples=16 eval=none"
run real_sft $REAL data=jsonl data.path=$REAL_ROWS data.batch_size=8
run real_dpo_copy $REAL data=pairs data.path=$REAL_PAIRS data.batch_size=4 module=dpo
run real_dpo_precomputed $REAL data=pairs data.path=$REAL_PAIRS data.batch_size=4 module=dpo module.reference=precomputed
# issue 33: the same rows and pairs packed (8 x 2048 tokens a row, SFT's and DPO's alike; DPO's tokens are chosen +
# rejected), each reference kind and the reference-free losses, against packed SFT in this same call
PACK="data.packing=true data.pack_tokens=16384"
run real_sft_packed $REAL data=jsonl data.path=$REAL_ROWS data.batch_size=8 $PACK
run real_dpo_packed_precomputed $REAL data=pairs data.path=$REAL_PAIRS module=dpo module.reference=precomputed $PACK
run real_dpo_packed_copy $REAL data=pairs data.path=$REAL_PAIRS module=dpo $PACK
run real_dpo_packed_adapter $REAL peft=lora data=pairs data.path=$REAL_PAIRS module=dpo $PACK
run real_simpo_packed $REAL data=pairs data.path=$REAL_PAIRS module=dpo module.loss_type=simpo module.beta=2.0 $PACK
run real_orpo_packed $REAL data=pairs data.path=$REAL_PAIRS module=dpo module.loss_type=orpo $PACK
run real_lora_sft $REAL peft=lora data=jsonl data.path=$REAL_ROWS data.batch_size=8
run real_dpo_adapter $REAL peft=lora data=pairs data.path=$REAL_PAIRS data.batch_size=4 module=dpo
for r in sft_eval fsdp_eval; do
  [ -f $RUNS/$r/csv/version_0/metrics.csv ] && $PY - "$RUNS/$r/csv/version_0/metrics.csv" <<'PY' | tee -a "$OUT/log.txt"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(sys.argv[1].split("/")[-4], {k: v for r in rows for k, v in r.items() if k.startswith("eval/") and v})
PY
done
