"""The data a run trains and validates on, logged as its MLflow run's inputs: the runs table's Dataset column shows
them, and the run's page lists each split's name, source, digest and number of rows.

Everything comes from what the data module already holds once set up, with no pass over the data: the digest of a
split is its `datasets` fingerprint, which stands for the source rows (a file's path and modification time, a Hub
dataset's revision), their tokenization and the seeded split.
"""

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger

CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT, what the UI labels inputs by


def short_digest(*parts) -> str:
    # MLflow shows digests of 8 characters (MetaDataset's own length).
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def dataset_inputs(datamodule: pl.LightningDataModule) -> list:
    """MLflow DatasetInputs for the training and validation splits of tunelab's data modules (set up); [] for any
    other data module, which tunelab cannot describe."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    from tunelab.data import InstructionDataModule, RandomTokenDataModule

    from tunelab.data.stream_datamodule import StreamingDataModule

    dm = datamodule
    if isinstance(dm, StreamingDataModule) and dm.streams:
        return [input for source, (_, val) in zip(dm.sources, dm.source_splits) for input in stream_inputs(source, val, dm)]
    if isinstance(dm, InstructionDataModule) and dm.train is not None:
        mixed = len(dm.sources) > 1  # each source its own pair of inputs, with its weight
        splits = dm.source_splits if mixed else [(dm.train, dm.val)]
        return [split_input(source.name, dataset_source(source, dm), short_digest(rows._fingerprint), len(rows), context,
                            {"weight": source.weight} if mixed else {})
                for source, (train, val) in zip(dm.sources, splits)
                for context, rows in (("training", train), ("validation", val))]
    if isinstance(dm, RandomTokenDataModule):
        generator = {"generator": "tunelab.data.RandomTokenDataModule", "vocab_size": dm.vocab_size,
                     "max_length": dm.max_length, "seed": dm.seed}
        source = CodeDatasetSource(generator)
        rows = {"training": dm.num_examples, "validation": dm.val_size}
        return [split_input("random-tokens", source, short_digest(generator, context, count), count, context)
                for context, count in rows.items()]
    return []


def stream_inputs(source, val, dm) -> list:
    """A streamed source: its training stream (no row count: the run reads as far as trainer.max_steps takes it) and
    its held-out first rows. The digest stands for the file (path, size, modification time) or Hub id and the order."""
    where = Path(str(source.path)).expanduser() if source.source == "jsonl" else None
    stamp = (where.stat().st_size, where.stat().st_mtime) if where is not None and where.is_file() else source.path
    digest = short_digest(source, stamp, dm.seed, dm.shuffle_block)
    profile = {"streaming": True, "weight": source.weight}
    return [split_input(source.name, dataset_source(source, dm), digest, 0, "training", profile),
            split_input(source.name, dataset_source(source, dm), short_digest(digest, "validation"), len(val),
                        "validation", profile)]


def dataset_source(source, dm):
    """MLflow's description of where a source's rows come from (a tunelab.data.mixing.Source)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource

    if source.source == "hub":
        return HuggingFaceDatasetSource(source.path, split=source.split)
    if source.source == "jsonl":
        return LocalArtifactDatasetSource(str(Path(source.path).expanduser().resolve()))
    return CodeDatasetSource({"generator": "tunelab.tiny_task", "num_examples": source.num_examples, "seed": dm.seed})


def split_input(name: str, source, digest: str, num_rows: int, context: str, profile: dict | None = None):
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    fields = MetaDataset(source, name=name, digest=digest).to_dict()  # MLflow's own source JSON and source type
    dataset = Dataset(**fields, profile=json.dumps({"num_rows": num_rows, **(profile or {})}))
    return DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, context)])


PREVIEW_ROWS = 8
PREVIEW_ARTIFACT = "data_preview.txt"


class DatasetInputLogger(pl.Callback):
    """Logs the splits as inputs of the MLflow run once the data module is set up (fit calls setup first), and the
    preview of what it trains on (tunelab.data.preview) as data_preview.txt."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger, dm = trainer.logger, trainer.datamodule
        if not isinstance(logger, MLFlowLogger) or dm is None or not trainer.is_global_zero:
            return
        if inputs := dataset_inputs(dm):
            from mlflow.exceptions import MlflowException

            try:
                logger.experiment.log_inputs(logger.run_id, datasets=inputs)
            except MlflowException:
                # Sweep trials that start together log the same dataset: MLflow's store looks it up, finds none and
                # inserts it, and the later of two inserts breaks the unique key (UNIQUE constraint failed:
                # datasets.experiment_id, datasets.name, datasets.digest). A second try finds it and links it.
                logger.experiment.log_inputs(logger.run_id, datasets=inputs)
        from tunelab.data import InstructionDataModule
        from tunelab.data.preview import preview_text

        if isinstance(dm, InstructionDataModule) and (dm.train is not None or getattr(dm, "streams", None)):
            logger.experiment.log_text(logger.run_id, preview_text(dm, PREVIEW_ROWS), PREVIEW_ARTIFACT)
