"""tunelab's Hydra launcher plugins: sweep trials as separate torchrun jobs, and hydra/launcher=slurm's SLURM launcher."""
