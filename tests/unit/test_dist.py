"""What a failed collective means for a person, and who reports an error before the process
group exists."""

import pytest
import torch.distributed as torch_dist

from pipeline import cli
from pipeline.dist import group


@pytest.mark.parametrize(
    "error, says",
    [
        (
            RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms"),
            "waited more than dist.timeout_s=5 s",
        ),
        (
            RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [1.2.3.4]:5"),
            "lost contact with a peer rank",
        ),
        (
            torch_dist.DistNetworkError("failed to recv, got 0 bytes"),
            "lost contact with a peer rank (failed to recv, got 0 bytes)",
        ),
        (  # the rendezvous store, a rank missing
            torch_dist.DistStoreError("Timed out after 6 seconds waiting for clients. 1/2 joined"),
            "waited more than dist.timeout_s=5 s",
        ),
    ],
)
def test_a_collective_failure_becomes_one_line_that_says_what_happened(error, says):
    err = group.collective_failure(error, timeout_s=5)
    assert err is not None and says in str(err) and "\n" not in str(err)
    assert err.exit_code == 6


def test_other_errors_are_not_taken_for_collective_failures():
    for text in ("mat1 and mat2 shapes cannot be multiplied", "the request timed out"):
        assert group.collective_failure(RuntimeError(text), 5) is None


def test_the_reporting_rank_comes_from_the_launchers_environment(monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert cli.env_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert cli.env_rank() == 3
    monkeypatch.setenv("RANK", "1")
    assert cli.env_rank() == 1
