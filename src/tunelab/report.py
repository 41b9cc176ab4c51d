"""What a finished run tells its user: a short summary on the terminal, a loss-curve plot and objective.json."""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tunelab.callbacks import ObjectiveTracker  # noqa: E402


def plot_loss_curves(tracker: ObjectiveTracker, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    # A diverged run's NaN/inf points stay off the plot (and off the log scale, which refuses them).
    train = [(step, loss) for step, loss in tracker.train_loss if math.isfinite(loss) and loss > 0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, label="train/loss", alpha=0.6)
    val = [(v["step"], v["val/loss"]) for v in tracker.validations
           if "val/loss" in v and math.isfinite(v["val/loss"]) and v["val/loss"] > 0]
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", label="val/loss")
    handles = ax.get_lines()
    if any("val/exact_match" in v for v in tracker.validations):
        acc = ax.twinx()
        handles += acc.plot([v["step"] for v in tracker.validations], [v.get("val/exact_match") for v in tracker.validations],
                            "s--", color="tab:green", label="val/exact_match")
        acc.set_ylabel("exact match")
        acc.set_ylim(0, 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if train or val:
        ax.set_yscale("log")
    ax.legend(handles=handles, loc="upper center")
    ax.set_title("tunelab: loss curves")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


SCORES = ("val/exact_match", "val/rewards/accuracy", "val/rewards/margin", "val/reward")


def summary_lines(tracker: ObjectiveTracker, objective: float, best_checkpoint: str | None, run_id: str | None,
                  tracking_uri: str | None, tokens_per_second: float | None) -> list[str]:
    last_val = tracker.validations[-1] if tracker.validations else {}
    lines = []  # only what was logged: a run shorter than trainer.log_every_n_steps logged no training step
    if tracker.train_loss:
        lines.append(f"train/loss (last step)   {tracker.train_loss[-1][1]:.4f}")
    if "val/loss" in last_val:
        lines.append(f"val/loss (last)          {last_val['val/loss']:.4f}")
    # the task's own score where the module logs one: exact match (SFT), DPO's reward accuracy and margin, GRPO's reward
    lines += [f"{name + ' (last)':<24} {last_val[name]:.3f}" for name in SCORES if name in last_val]
    lines.append(f"objective {tracker.metric} ({tracker.mode})  {objective:.4f}")
    if tokens_per_second is not None:
        lines.append(f"throughput               {tokens_per_second:,.0f} tokens/s")
    lines.append(f"best checkpoint          {best_checkpoint or '-'}")
    if run_id:
        lines.append(f"MLflow run               {run_id}  (store {tracking_uri})")
        lines.append("open the UI with         make ui   (http://127.0.0.1:5000)")
    return lines


def sample_lines(samples: list[dict], width: int = 40) -> list[str]:
    """The last validation's generation samples (tunelab.samples): the end of each prompt, the start of its greedy
    answer, and what was expected where that differs."""
    if not samples:
        return []

    def tail(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else "…" + text[1 - width:]

    def head(text: str) -> str:
        text = " ".join(text.split())
        return (text if len(text) <= width else text[:width - 1] + "…") or "(nothing)"

    exact = sum(sample["exact"] for sample in samples)
    lines = [f"generated (step {samples[0]['step']})".ljust(25) + f"{exact}/{len(samples)} exact, greedy"]
    prompt_width = max(len(tail(sample["prompt"])) for sample in samples)
    for sample in samples:
        line = f"  {tail(sample['prompt']):<{prompt_width}}  → {head(sample['generated'])}"
        lines.append(line if sample["exact"] else f"{line}   (expected {head(sample['expected'])})")
    return lines


def finish_run(cfg, trainer, tracker: ObjectiveTracker, model, tokenizer, output_dir: Path, weights=None) -> None:
    """Export, plot, log the objective and print the summary of a finished fit (rank 0 only). `weights`: the model's
    weights gathered from its FSDP shards by every rank, when it is sharded."""
    from tunelab.callbacks import TokenThroughputMonitor
    from tunelab.export import export_run
    from tunelab.logger import log_run_artifact
    from tunelab.samples import GenerationSamples

    export = export_run(cfg, trainer, model, tokenizer, output_dir / "export", weights)
    plot = plot_loss_curves(tracker, output_dir / "loss_curves.png")
    logger = trainer.logger
    run_id = getattr(logger, "run_id", None)
    if logger is not None:
        logger.log_metrics({"objective": tracker.best}, step=trainer.global_step)
        log_run_artifact(logger, plot)
    throughput = next((c for c in trainer.callbacks if isinstance(c, TokenThroughputMonitor)), None)
    checkpoint = trainer.checkpoint_callback
    lines = summary_lines(
        tracker,
        tracker.best,
        getattr(checkpoint, "best_model_path", None) or None,
        run_id,
        getattr(logger, "_tracking_uri", None),
        throughput.tokens_per_second if throughput else None,
    )
    lines.append(f"loss curves              {plot}")
    if export is not None:
        lines.append(f"export                   {export}   (python generate.py {output_dir} \"<prompt>\")")
    samples = next((c for c in trainer.callbacks if isinstance(c, GenerationSamples)), None)
    lines += sample_lines(samples.last if samples else [])
    evaluation = next((c for c in trainer.callbacks if type(c).__name__ == "BenchmarkEvaluation"), None)
    lines += evaluation.summary() if evaluation else []  # tunelab.evaluation: a line per task score
    write_objective(output_dir / "objective.json", tracker, trainer, run_id, throughput.tokens_per_second if throughput else None)
    print("\n".join(["", "── tunelab run summary " + "─" * 40, *lines, ""]), flush=True)


def write_objective(path: Path, tracker: ObjectiveTracker, trainer, run_id: str | None, tokens_per_second: float | None) -> Path:
    """The run's result for whoever started it as a separate process (the torchrun sweep launcher reads it back)."""
    import torch

    result = {
        "objective": tracker.best,
        "metric": tracker.metric,
        "mode": tracker.mode,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "tokens_per_second": tokens_per_second,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "mlflow_run_id": run_id,
    }
    path.write_text(json.dumps(result, indent=1))
    return path
