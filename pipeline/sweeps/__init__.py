"""Sweeps: many runs of one base config, on this machine, as a SLURM job array or under a W&B
agent.

- `spec`: a sweep file (configs/sweeps/*.yaml) read and checked, expanded into its points.
- `local`: the points run on this machine, one or N at a time, finished ones skipped.
- `slurm`: the points submitted as one SLURM job array (slurm/sweep.sbatch).
"""
