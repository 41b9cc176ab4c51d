"""Prints what a run would train on and exits, before any model loads: `python preview.py [train.py's overrides]
[+rows=N]`. The first N training rows (default 4) decoded, the trained tokens marked, the length distribution, the
mix's shares and, with packing, the fill of the packed rows (tunelab/data/preview.py)."""

import sys
import tempfile

import hydra
from omegaconf import DictConfig

from tunelab.config import ConfigError, validate_config


@hydra.main(config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        rows = cfg.get("rows", 4)
        validate_config(cfg)
        from tunelab.data import build_datamodule
        from tunelab.data.checks import check_data_rows
        from tunelab.data.preview import preview_text
        from tunelab.inputs import load_tokenizer
        from tunelab.progress import plain_lines_outside_a_terminal

        plain_lines_outside_a_terminal()
        tokenizer = load_tokenizer(cfg.model)
        check_data_rows(cfg.data, tokenizer)
    except ConfigError as error:
        sys.exit(f"tunelab: error: {error}")
    datamodule = build_datamodule(cfg.data, tokenizer)
    datamodule.prepare_data()
    datamodule.setup("fit")
    print(preview_text(datamodule, rows, colour=sys.stdout.isatty()), end="")


if __name__ == "__main__":
    # A preview writes nothing: Hydra's run directory (its log, .hydra/) is a temporary one, unless one is asked for.
    with tempfile.TemporaryDirectory(prefix="tunelab-preview-") as run_dir:
        if not any(arg.startswith("hydra.run.dir=") for arg in sys.argv[1:]):
            sys.argv.append(f"hydra.run.dir={run_dir}")
        main()
