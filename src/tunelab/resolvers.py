"""Config interpolations of tunelab's own, registered as the package is imported (before Hydra resolves a config).

`${tunelab.recommended_lr:${oc.select:model.recommended_lr,null},${peft}}` is the default of `optim.lr`: the learning
rate the model option recommends for a full fine-tune (`full`) or for adapters (`adapter`, LoRA and QLoRA). Full
fine-tunes of 1B+ models diverge at the embedded tiny model's rate (3e-3), and adapters want about 10x the full rate.

`${tunelab.slurm_tasks:${trainer.devices}}` is hydra/launcher=slurm's tasks (and GPUs) per node: `trainer.devices`, where
`auto` asks for one, which is what Lightning's `auto` then finds in a one-GPU (or CPU) allocation.

`${tunelab.study_name:<sweep>,<module>,<model>,<data>}` (the options picked) is a sweep's default study name:
`lora_search-tiny-tiny`, or with no `sweep=` option (the search space on the command line) the module's,
`dpo-tiny-tiny_pairs`.
"""

from omegaconf import OmegaConf

# For a model option that names no recommended_lr: the common choices for 1B-8B decoder models.
GENERIC_LR = {"full": 2.0e-5, "adapter": 2.0e-4}


def recommended_lr(rates, peft) -> float:
    kind = "adapter" if peft else "full"
    return float((rates or GENERIC_LR).get(kind, GENERIC_LR[kind]))


def slurm_tasks(devices):
    return 1 if devices == "auto" else devices  # the launcher refuses what is not a count of tasks


def study_name(sweep, module, model, data) -> str:
    return "-".join(str(option) for option in (sweep or module, model, data))


OmegaConf.register_resolver("tunelab.recommended_lr", recommended_lr, replace=True)
OmegaConf.register_resolver("tunelab.slurm_tasks", slurm_tasks, replace=True)
OmegaConf.register_resolver("tunelab.study_name", study_name, replace=True)
