"""Distribution: who this process is in the job and the process group with every collective
(group), SLURM's variables (slurm), and `--nproc-per-node` (launch)."""
