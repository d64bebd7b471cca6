"""Launch tooling: Cloud TPU VMs, SLURM and local GPUs, and the sweep runner (see README.md)."""
