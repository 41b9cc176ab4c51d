"""tunelab's Hydra launcher plugin: sweep trials as separate torchrun jobs."""
