"""The `module` group: tunelab's LightningModules side by side, one file per option (causal_lm.py, dpo.py, grpo.py), on what
they share (base.py: optimizer, sharding, checkpoints, step logging; logprobs.py: the log-probabilities of labelled
tokens)."""
