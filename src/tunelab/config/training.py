"""What the run optimises and reports: the optimizer's schedule, the trainer's intervals, the checkpoint it resumes,
the objective, and module=dpo with its preference pairs."""

import zipfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tunelab.config.evaluation import EVAL_PREFIX
from tunelab.config.fields import DPO_FIELDS, check_fields
from tunelab.errors import ConfigError, show
from tunelab.strategy import shards_parameters

GENERATED_EXACT_MATCH = "val/generated_exact_match"  # logged by the samples callback (tunelab.samples)
DPO_MODULE, PREFERENCE_DATA = "tunelab.modules.dpo.DPOModule", "tunelab.data.preference.PreferenceDataModule"
DPO_METRICS = tuple(f"val/{name}" for name in ("rewards/accuracy", "rewards/margin", "rewards/chosen",
                                               "rewards/rejected", "logps/chosen", "logps/rejected"))  # module=dpo's
REFERENCE_FREE = ("simpo", "orpo")  # module.loss_type values with no reference pass (tunelab.modules.dpo)
GRPO_METRICS = ("val/reward",)  # module=grpo's: the weighted reward of greedy answers to the validation prompts
VALIDATION_METRICS = ("val/loss", "val/exact_match", GENERATED_EXACT_MATCH, *DPO_METRICS, *GRPO_METRICS)


def check_optim(cfg: DictConfig) -> None:
    optim = cfg.optim
    if optim.warmup_steps is not None and optim.warmup_ratio:
        raise ConfigError("give optim.warmup_steps or optim.warmup_ratio, not both (set the other to null)")
    if optim.warmup_steps is None and optim.warmup_ratio is None:
        raise ConfigError("optim.warmup_steps and optim.warmup_ratio are both null: give one (0 for no warmup)")


def check_trainer(cfg: DictConfig) -> None:
    """Lightning reads a float in these keys as a fraction of an epoch and an integer as a number of batches."""
    for key in ("val_check_interval", "limit_val_batches"):
        value = cfg.trainer.get(key)
        if isinstance(value, float) and value > 1:
            raise ConfigError(f"trainer.{key}={show(value)}: a float is a fraction of an epoch (at most 1.0); "
                              f"give a number of batches as an integer, e.g. trainer.{key}={int(value)}")
    interval = cfg.trainer.get("val_check_interval")
    if isinstance(interval, float) and cfg.trainer.get("check_val_every_n_epoch") is None:
        raise ConfigError(f"trainer.val_check_interval={show(interval)} is a fraction of an epoch, which Lightning counts "
                          "only with trainer.check_val_every_n_epoch set: give a number of steps as an integer (e.g. "
                          "trainer.val_check_interval=100), or add trainer.check_val_every_n_epoch=1")


def check_run(cfg: DictConfig) -> None:
    if cfg.ckpt_path not in (None, "last"):
        path = Path(cfg.ckpt_path).expanduser()
        if not path.exists():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint (or use ckpt_path=last)")
        if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes zip archives; sharded ones are dirs
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a PyTorch checkpoint (truncated or another kind of file)")


def check_objective(cfg: DictConfig) -> None:
    """ModelCheckpoint and EarlyStopping stop the run at the first validation that does not log the objective."""
    if cfg.objective.metric.startswith(EVAL_PREFIX):
        return  # a benchmark's score: check_evaluation holds it to the eval option
    names = [entry.name for entry in cfg.data.get("sources") or []]
    per_source = tuple(f"{metric}/{name}" for name in names for metric in VALIDATION_METRICS[:2])
    if cfg.objective.metric not in VALIDATION_METRICS + per_source:
        raise ConfigError(f"objective.metric={show(cfg.objective.metric)} is not one of: "
                          f"{', '.join(VALIDATION_METRICS + per_source)}")
    if cfg.objective.metric != GENERATED_EXACT_MATCH:
        return
    if OmegaConf.select(cfg, "callbacks.samples") is None:
        raise ConfigError(f"objective.metric={GENERATED_EXACT_MATCH} is logged by the samples callback, which is off: "
                          "drop callbacks.samples=null (or callbacks=none), or pick another objective.metric")
    if cfg.data.get("source") == "random_tokens":
        raise ConfigError(f"objective.metric={GENERATED_EXACT_MATCH} needs data with prompts and answers; "
                          "data=random_tokens has none")


def is_dpo(cfg: DictConfig) -> bool:
    return bool(cfg.get("module")) and cfg.module.get("_target_") == DPO_MODULE


def check_preference(cfg: DictConfig) -> None:
    """module=dpo (tunelab.modules.dpo) and preference pairs (tunelab.data.preference) go together; the DPO keys."""
    pairs = cfg.data.get("_target_") == PREFERENCE_DATA
    if pairs and not is_dpo(cfg):
        raise ConfigError(f"data={cfg.data.source} holds preference pairs (prompt, chosen, rejected), which "
                          f"module._target_={cfg.module.get('_target_')} does not train on: use module=dpo")
    if not is_dpo(cfg):
        if cfg.objective.metric in DPO_METRICS:
            raise ConfigError(f"objective.metric={cfg.objective.metric} is logged by module=dpo only: pick another "
                              "objective.metric, or use module=dpo")
        return
    if not pairs:
        raise ConfigError("module=dpo trains on preference pairs: use data=tiny_pairs, or data=pairs "
                          "data.path=<a JSON-lines file of prompt, chosen, rejected>")
    check_fields(cfg, DPO_FIELDS)
    module, data = cfg.module, cfg.data
    if module.get("label_smoothing") and module.get("loss_type") != "robust":
        raise ConfigError(f"module.label_smoothing={show(module.label_smoothing)} is for module.loss_type=robust "
                          f"(not {module.get('loss_type')}): set the loss type, or label_smoothing=0")
    loss_type, reference = module.get("loss_type", "sigmoid"), module.get("reference", "auto")
    for key, owner in (("gamma", "simpo"), ("orpo_lambda", "orpo")):
        if module.get(key) is not None and loss_type != owner:
            raise ConfigError(f"module.{key}={show(module[key])} is for module.loss_type={owner} (not {loss_type}): "
                              f"set the loss type, or module.{key}=null")
    if loss_type in REFERENCE_FREE and reference != "auto":
        raise ConfigError(f"module.loss_type={loss_type} needs no reference (it is reference-free), so "
                          f"module.reference={reference} has nothing to do: drop it (module.reference=auto)")
    if loss_type == "orpo" and module.get("sft_weight"):
        raise ConfigError(f"module.sft_weight={show(module.sft_weight)}: module.loss_type=orpo has its own NLL term, "
                          "weight 1 (module.orpo_lambda weighs the odds-ratio term against it): set sft_weight=0")
    if reference == "adapter" and not cfg.peft:
        raise ConfigError("module.reference=adapter needs an adapter to switch off: use peft=lora, or "
                          "module.reference=auto (a frozen copy for a full fine-tune)")
    if shards_parameters(cfg.strategy) and not cfg.peft and reference in ("auto", "copy") \
            and loss_type not in REFERENCE_FREE:
        raise ConfigError(f"module=dpo under strategy={cfg.strategy.name} would keep a whole frozen copy of the model "
                          "on every GPU as its reference: set module.reference=precomputed")
    if data.source == "tiny_pairs" and data.num_examples is None:
        raise ConfigError("data=tiny_pairs generates data.num_examples pairs: give a number, e.g. data.num_examples=2000")
    if cfg.objective.metric == "val/exact_match":
        raise ConfigError("objective.metric=val/exact_match is not logged by module=dpo: use val/loss, "
                          f"{GENERATED_EXACT_MATCH} or one of {', '.join(DPO_METRICS)}")
