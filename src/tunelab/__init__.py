"""tunelab: Hydra-composed LLM fine-tuning on Lightning."""

__version__ = "0.1.0"

import logging

import tunelab.resolvers  # noqa: F401  (optim.lr's default interpolation)

# bitsandbytes (imported by peft when installed) warns at import, on CPUs with AVX512-BF16, that it cannot fetch an
# optional kernel from the hub; it falls back to its own, and the warning would break a bad config's one-line error.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
