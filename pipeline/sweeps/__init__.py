"""Sweeps: many runs of one base config, on this machine (local), as a SLURM job array (slurm)
or under a W&B agent; a sweep file and its points (spec)."""
