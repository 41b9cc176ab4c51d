"""tunelab: Hydra-composed LLM fine-tuning on Lightning."""

__version__ = "0.1.0"
