"""Prints benchmarks/probes/ddp_probe_train.py's records side by side: per step, each rank's loss, local and reduced
gradient norms, whether any bucket held a non-finite value, and the largest activation.

    python benchmarks/probes/probe_summary.py <probe dir of one run (rank*.jsonl)>
"""

import json
import sys
from pathlib import Path

runs = {int(p.stem.removeprefix("rank")): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(Path(sys.argv[1]).glob("rank*.jsonl"))}
for records in zip(*runs.values()):
    first = records[0]
    cells = []
    for r in records:
        local = [b["norm"] for b in r.get("buckets", [])]
        finite = all(b["finite"] for b in r.get("buckets", []))
        act = max(r.get("activation_max", {"": 0.0}).values())
        cells.append(f"r{r['rank']} loss {r['loss']:.4f} local {sum(x * x for x in local) ** 0.5:.3g}{'' if finite else '!'} "
                     f"act {act:.3g}")
    print(f"step {first['step']:3d} lr {first['lr']:.2e} grad {first['grad_norm']:.4g} maxg {first['max_abs_grad']:.3g} "
          f"w {first['weights_sum']:.6g}/{first['weights_max']:.3g} bad {first['nonfinite_grad_count']} | " + " | ".join(cells))
