"""Saves a model option's architecture, randomly initialised, as a local from_pretrained directory: a stand-in for a
hub checkpoint where nothing can be downloaded (the QLoRA benchmark quantizes it as it loads).

Usage: python benchmarks/save_random_model.py <model option, e.g. llama1b> <directory>
"""

import sys

from hydra import compose, initialize_config_dir

from tunelab.model import build_model, build_tokenizer


def main(option: str, directory: str) -> None:
    with initialize_config_dir(config_dir=f"{sys.path[0]}/../conf", version_base=None):
        cfg = compose("train", overrides=[f"model={option}", "model.init=random", "model.tokenizer=char", "precision=bf16_true"])
    tokenizer = build_tokenizer(cfg.model)
    build_model(cfg.model, cfg.precision, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"saved random {option} to {directory}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
