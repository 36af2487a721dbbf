"""DDP is wired right: two real gloo ranks with batch B each match one rank with batch 2B."""

import torch

from helpers import TINY_ARGS, assert_ok, final_model, max_diff, run_pipeline

STEPS = 8


def _train(tiny_mnist, run_dir, nproc, batch, extra=()):
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        f"train.batch_size={batch}",
        f"train.max_steps={STEPS}",
        "optim.lr=0.1",
        "optim.momentum=0.9",
        *extra,
    ]
    assert_ok(run_pipeline(args, nproc=nproc))
    return final_model(run_dir)


def test_two_ranks_match_one_rank_with_the_global_batch(tiny_mnist, tmp_path):
    one = _train(tiny_mnist, tmp_path / "one", nproc=1, batch=64)
    two = _train(tiny_mnist, tmp_path / "two", nproc=2, batch=64)  # 32 per rank
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    # The comparison is sensitive: half the batch (other samples, other gradients) drifts far
    # beyond the tolerance, as would summed instead of averaged gradients.
    half = _train(tiny_mnist, tmp_path / "half", nproc=1, batch=32)
    assert max_diff(one, half) > 1e-3


def test_gradient_accumulation_matches_the_full_batch(tiny_mnist, tmp_path):
    full = _train(tiny_mnist, tmp_path / "full", nproc=2, batch=64)
    accum = _train(
        tiny_mnist, tmp_path / "accum", nproc=2, batch=64, extra=["train.grad_accum=2"]
    )  # 2 ranks x 2 micro-steps x 16
    for k in full:
        torch.testing.assert_close(accum[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
