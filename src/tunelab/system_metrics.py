"""GPU utilisation and memory (and CPU, memory, disk, network) logged to the MLflow run as `system/...` metrics by
MLflow's own monitor, which reads the GPUs through nvidia-ml-py and the rest through psutil.

`system_metrics` (conf/train.yaml): `auto` (on where the run trains on CUDA GPUs), `true` or `false`. The monitor
samples every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) in a thread of rank 0, which sees every GPU of its node.
"""

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger


def wants_system_metrics(setting: str | bool, device_type: str) -> bool:
    return device_type == "cuda" if setting == "auto" else bool(setting)


class SystemMetricsLogger(pl.Callback):
    def __init__(self, setting: str | bool, tracking_uri: str):
        self.setting = setting
        self.tracking_uri = tracking_uri
        self.monitor = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger) or not wants_system_metrics(self.setting, trainer.strategy.root_device.type):
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # resume_logging: a preempted run's continuation goes on from the steps its first part logged.
        self.monitor = SystemMetricsMonitor(logger.run_id, resume_logging=True, tracking_uri=self.tracking_uri)
        self.monitor.start()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.stop()

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
