"""Which lock holder counts as "the same job" (pipeline/training/lock.py): the same Slurm job or the
same torchrun run, never two jobs without ids. (The lock on real jobs:
tests/multiproc/test_run_lock.py.)"""

from __future__ import annotations

from pipeline.training import lock


def test_same_job_means_the_same_slurm_job_or_torchrun_run():
    assert lock.same_job({"slurm_job_id": "7"}, {"slurm_job_id": "7"})
    assert not lock.same_job({"slurm_job_id": "7"}, {"slurm_job_id": "8"})
    assert lock.same_job({"torchrun_run_id": "x"}, {"torchrun_run_id": "x"})
    assert not lock.same_job({"torchrun_run_id": None}, {"torchrun_run_id": None})
